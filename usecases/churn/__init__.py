"""Churn prediction: the platform's first use case (simulator here; see ``usecases`` for the rest)."""
