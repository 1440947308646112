"""HTTP and WebSockets, served by Daphne: `daphne config.asgi:application`."""

import gc
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

daphne_access_log_to_records()  # every line of the process goes through LOGGING

web_process_start()

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


async def application(scope, receive, send):
    """The router; the first connection served starts the loop-lag timer on the loop."""
    loop_lag_watch()
    return await router(scope, receive, send)
