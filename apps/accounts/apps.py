from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "apps.accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Django's logout (the site's and the admin's) announces itself only by this
        # signal, sent before the session is flushed: that session's sockets close.
        from django.contrib.auth.signals import user_logged_out

        user_logged_out.connect(logged_out_sockets_end, dispatch_uid="parley-logout")


def logged_out_sockets_end(sender, request, user, **kwargs) -> None:
    from .services import user_sockets_end

    if user is not None and request.session.session_key:
        user_sockets_end(
            user_id=user.pk, reason="logged_out", session_key=request.session.session_key
        )
