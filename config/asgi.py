"""HTTP and WebSockets, served by Daphne: `daphne config.asgi:application`."""

import gc
import ipaddress
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import OriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from apps.realtime.routing import websocket_urlpatterns  # noqa: E402
from config import celery_app  # noqa: E402

# Bind the Celery tasks now: the first use of a task otherwise finalizes the app on
# the event loop (17 ms of CPU measured, 25-31 ms under load: the first enqueue of a
# socket's first utterance; test_streaming_load's loop guard caught it).
celery_app.finalize(auto=True)

# Long-lived objects of start-up (modules, settings, URL resolvers) go out of the
# collector's reach, and collections of the young generations run less often:
# with hundreds of sessions a full collection over the whole heap is a pause
# every socket feels (docs/benchmarks.md, density).
gc.collect()
gc.freeze()
gc.set_threshold(*settings.GC_THRESHOLDS)
if settings.GC_PAUSE_LOG_MS:
    from apps.observability.loopguard import gc_pauses_log

    gc_pauses_log(settings.GC_PAUSE_LOG_MS)

if settings.LOOP_GUARD_MS:
    from apps.observability.loopguard import install

    install(settings.LOOP_GUARD_MS)

from apps.observability.collectors import loop_lag_watch, web_process_start  # noqa: E402
from apps.observability.health import HealthProbes  # noqa: E402
from apps.observability.logging import daphne_access_log_to_records  # noqa: E402
from apps.pipeline.providers.registry import llm_warm_in_background  # noqa: E402
from apps.realtime.sweeper import sweeper_start  # noqa: E402

daphne_access_log_to_records()  # every line of the process goes through LOGGING

from apps.realtime.drain import (  # noqa: E402
    daphne_close_codes_allow_service_restart,
    daphne_shutdown_closes_sockets,
)

daphne_close_codes_allow_service_restart()  # a draining process closes with 1012
daphne_shutdown_closes_sockets()  # and so does one that is stopped (SIGTERM, Ctrl-C)

from apps.realtime.daphne_limits import daphne_limits_install  # noqa: E402

# Messages over WS_MESSAGE_MAX_BYTES close with 1009 at Daphne (not its 1 MiB default).
daphne_limits_install(max_message_bytes=settings.WS_MESSAGE_MAX_BYTES)

web_process_start()
llm_warm_in_background()

router = ProtocolTypeRouter(
    {
        # /healthz and /readyz are answered before any middleware (health.py).
        "http": HealthProbes(django_asgi_app),
        "websocket": OriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
            settings.WEBSOCKET_ALLOWED_ORIGINS,
        ),
    }
)


def from_this_machine(scope) -> bool:
    """Whether the peer (Daphne's TCP peer, never a header) is a loopback address."""
    client = scope.get("client")
    if not client:
        return True  # a Unix socket
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


REMOTE_REFUSED = (
    "This server runs with the public development SECRET_KEY, so it serves this machine "
    "only. Set SECRET_KEY (and DJANGO_ENV=production) to serve other machines."
)


async def refuse_remote(scope, receive, send) -> None:
    if scope["type"] == "http":
        body = REMOTE_REFUSED.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 4403, "reason": "loopback only"})


async def application(scope, receive, send):
    """The router. The first connection served (a probe, at the latest) starts the
    loop-lag timer and the sweeper of dead web processes on the loop."""
    loop_lag_watch()
    sweeper_start()
    if settings.LOOPBACK_ONLY and not from_this_machine(scope):
        return await refuse_remote(scope, receive, send)
    return await router(scope, receive, send)
