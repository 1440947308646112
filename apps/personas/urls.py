from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("personas/<slug:slug>/talk/", views.talk, name="persona_talk"),
    path("personas/<slug:slug>/avatar.png", views.avatar, name="persona_avatar"),
]
