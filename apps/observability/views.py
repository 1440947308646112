"""/metrics. The probes /healthz and /readyz are answered in front of Django
(health.py, wrapped around the HTTP application in config/asgi.py)."""

import sys

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.views.defaults import server_error as default_server_error

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


def server_error(request):
    """handler500. An error from a database that is down or restarting (connect
    refused or timed out, connection lost) is a 503 with Retry-After, so clients
    and load balancers retry; any other error is Django's 500."""
    if isinstance(sys.exc_info()[1], OperationalError | InterfaceError):
        response = HttpResponse(DATABASE_DOWN, status=503, content_type="text/plain")
        response["Retry-After"] = "2"
        return response
    return default_server_error(request)
