from django.urls import path

from . import views

urlpatterns = [
    path("", views.history, name="history"),
    path("<uuid:conversation_id>/", views.conversation, name="conversation"),
    path("<uuid:conversation_id>/transcript/", views.transcript, name="transcript"),
]
