"""/metrics. The probes /healthz and /readyz are answered in front of Django
(health.py, wrapped around the HTTP application in config/asgi.py)."""

import sys

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.views.defaults import server_error as default_server_error
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .exposition import metrics_response


def metrics(request):
    """This process's metrics, for a bearer of METRICS_TOKEN (exposition.py). A
    sync view: Django runs it on a thread, so collectors that read Redis or
    PgBouncer at scrape time never run on the event loop."""
    status, headers, body = metrics_response(request.headers.get("Authorization"))
    response = HttpResponse(body, status=status, content_type=headers.pop("Content-Type"))
    for name, value in headers.items():
        response[name] = value
    return response


DATABASE_DOWN = "The service is briefly unavailable; try again in a moment."
# A database, or the Redis of the cache and sessions, down or restarting: connect
# refused or timed out, connection lost (seen in `make soak`: three 500s while its
# Redis restarted).
SERVICE_DOWN = (
    OperationalError, InterfaceError, RedisConnectionError, RedisTimeoutError,
    ConnectionInterrupted,
)  # fmt: skip


def server_error(request):
    """handler500. An error from a service that is down or restarting (SERVICE_DOWN)
    is a 503 with Retry-After, so clients and load balancers retry; any other error
    is Django's 500."""
    if isinstance(sys.exc_info()[1], SERVICE_DOWN):
        response = HttpResponse(DATABASE_DOWN, status=503, content_type="text/plain")
        response["Retry-After"] = "2"
        return response
    return default_server_error(request)
