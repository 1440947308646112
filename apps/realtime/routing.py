from django.conf import settings
from django.urls import path

from . import consumers, echo

websocket_urlpatterns = [
    path("ws/conversations/<uuid:conversation_id>/", consumers.ConversationConsumer.as_asgi()),
]
if not settings.PRODUCTION:  # an unauthenticated probe of the socket stack: never in production
    websocket_urlpatterns.append(path("ws/echo/", echo.EchoConsumer.as_asgi()))
