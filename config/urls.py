from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("apps.accounts.urls")),
    path("conversations/", include("apps.conversations.urls")),
    path("", include("apps.observability.urls")),
    path("", include("apps.personas.urls")),
]

# An uncaught error: a database that is down is a 503 with Retry-After, anything else a 500.
handler500 = "apps.observability.views.server_error"
