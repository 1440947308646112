"""/metrics. The probes /healthz and /readyz are answered in front of Django
(health.py, wrapped around the HTTP application in config/asgi.py)."""

from django.http import HttpResponse

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
