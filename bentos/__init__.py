"""BentoML services: the churn service (CPU) and its GPU variant."""
