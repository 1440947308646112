from django.urls import include, path

from . import views

urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("usage/", views.usage, name="usage"),
    path("", include("django.contrib.auth.urls")),
]
