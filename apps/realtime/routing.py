from django.urls import path

from . import consumers, echo

websocket_urlpatterns = [
    path("ws/conversations/<uuid:conversation_id>/", consumers.ConversationConsumer.as_asgi()),
    path("ws/echo/", echo.EchoConsumer.as_asgi()),
]
