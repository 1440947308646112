"""The Prometheus text exposition of this process, behind the bearer token
METRICS_TOKEN: the web /metrics view (views.metrics) and each worker's exporter
(exporter.py) answer through `metrics_response`. With no token configured
everyone is refused (403), in every environment: metrics say how busy, how
large and how failing the service is."""

from __future__ import annotations

import hmac

from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

DISABLED = "metrics disabled: set METRICS_TOKEN\n"
UNAUTHORIZED = "metrics need Authorization: Bearer <METRICS_TOKEN>\n"


def metrics_refusal(authorization: str | None, token: str | None = None) -> tuple[int, str] | None:
    """(status, text) when a request with this Authorization header is refused."""
    token = settings.METRICS_TOKEN if token is None else token
    if not token:
        return 403, DISABLED
    expected = f"Bearer {token}".encode()
    if not hmac.compare_digest((authorization or "").encode(), expected):
        return 401, UNAUTHORIZED
    return None


def metrics_response(authorization: str | None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a /metrics request: this process's registry."""
    refused = metrics_refusal(authorization)
    if refused is not None:
        status, text = refused
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return status, headers, text.encode()
    return 200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(REGISTRY)
