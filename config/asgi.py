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

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": OriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
            settings.WEBSOCKET_ALLOWED_ORIGINS,
        ),
    }
)
