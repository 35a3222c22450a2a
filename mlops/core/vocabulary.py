"""The category levels of the SaaS domain: one definition, shared by schemas, features and serving."""

PLANS = ("starter", "pro", "enterprise")
SEGMENTS = ("smb", "mid_market", "enterprise")
BILLING_EVENT_TYPES = ("invoice_paid", "payment_failed")
TICKET_CATEGORIES = ("billing", "bug", "how_to", "outage", "feature_request")
