"""Names shared by the registry, the serving manifest, the service and the prediction log."""

CHAMPION = "champion"  # what serves: the response of every request
CHALLENGER = "challenger"  # a candidate that passed every gate: scored in shadow, never returned
ROLES = (CHAMPION, CHALLENGER)
EXPERIMENT_NAME = "saas-churn"
CHURN = "churn"  # the first use case: its tables, assets and routes keep their unprefixed names


def registered_model_name(tenant: str, use_case: str = CHURN) -> str:
    """A tenant's model of a use case in the MLflow registry: ``<use_case>-<tenant>`` (``churn-acme``)."""
    return f"{use_case}-{tenant}"
