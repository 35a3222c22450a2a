"""The alert webhook: where the platform's alerts go (``mlops.core.alerts``), off by default.

Configured by the environment of the Dagster code location (and of the CLI):

- ``MLOPS_ALERT_WEBHOOK_URL``: a Slack-compatible incoming webhook. Unset: no alert is sent. It is
  read through ``dg.EnvVar``, so the UI shows the variable's name, never the URL (its path is the
  secret);
- ``MLOPS_DAGSTER_UI_URL``: the Dagster UI base URL the alerts link to (default ``http://127.0.0.1:3000``).
"""

from __future__ import annotations

import os

import dagster as dg

from mlops.core.alerts import DEFAULT_UI_BASE_URL, UI_BASE_URL_ENV, WEBHOOK_URL_ENV, Notifier, notifier_for
from resources.settings import PlatformSettings


class AlertWebhook(dg.ConfigurableResource):
    """Sends alerts to a Slack-compatible webhook once per event (a ledger in the home remembers)."""

    settings: PlatformSettings
    url: str | None = None
    ui_base_url: str = DEFAULT_UI_BASE_URL
    timeout_s: float = 5.0
    attempts: int = 3
    # The service is reported down after this many failed /readyz probes in a row (one alert), and
    # up again at its first answer after that (one alert).
    readyz_failures_before_alert: int = 2

    @classmethod
    def from_env(cls, settings: PlatformSettings, **overrides) -> AlertWebhook:
        url = dg.EnvVar(WEBHOOK_URL_ENV) if os.environ.get(WEBHOOK_URL_ENV) else None
        return cls(settings=settings, url=url, ui_base_url=os.environ.get(UI_BASE_URL_ENV) or DEFAULT_UI_BASE_URL,
                   **overrides)

    @property
    def webhook_url(self) -> str | None:
        """The URL; resolved from its variable where the resource was not initialized by Dagster (the CLI)."""
        url = self.url
        if isinstance(url, dg.EnvVar):
            url = url.get_value()
        return url or None

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None

    def notifier(self) -> Notifier:
        return notifier_for(self.settings.root, self.webhook_url, timeout_s=self.timeout_s, attempts=self.attempts)
