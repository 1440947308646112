from django.apps import AppConfig
from django.core.exceptions import ImproperlyConfigured


class ConversationsConfig(AppConfig):
    name = "apps.conversations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Every process (web, workers, manage.py) refuses to start on malformed prices.
        from .costs import PriceError, prices

        try:
            prices()
        except PriceError as exc:
            raise ImproperlyConfigured(str(exc)) from None
