from django import forms
from django.conf import settings
from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from .avatars import AvatarRejected, avatar_encode, avatar_version
from .models import Persona
from .services import persona_avatar_set, persona_delete, persona_duplicate, persona_save


class PersonaForm(forms.ModelForm):
    """The persona, plus its avatar image: checked and re-encoded on upload
    (avatars.py); a bad file is a form error, and nothing of the edit is saved."""

    avatar_upload = forms.FileField(
        required=False,
        label="Avatar image",
        help_text="PNG, JPEG, WebP or GIF, at most 2 MB and 4096 × 4096 pixels; shown as a"
        " 256 px square. With none, the name's initials are shown.",
        widget=forms.ClearableFileInput(
            attrs={"accept": "image/png,image/jpeg,image/webp,image/gif"}
        ),
    )
    avatar_remove = forms.BooleanField(required=False, label="Remove the avatar image")

    class Meta:
        model = Persona
        fields = (
            "name", "slug", "avatar", "description", "is_published", "system_prompt", "greeting",
            "voice", "llm_kind", "llm_model", "temperature", "max_tokens", "stt_kind", "tts_kind",
        )  # fmt: skip

    def clean_avatar_upload(self) -> bytes | None:
        upload = self.cleaned_data.get("avatar_upload")
        if not upload:
            return None
        if upload.size > settings.AVATAR_UPLOAD_MAX_BYTES:  # before reading it
            limit = settings.AVATAR_UPLOAD_MAX_BYTES / 1e6
            raise forms.ValidationError(
                f"The image is {upload.size / 1e6:.1f} MB; the most allowed is {limit:.1f} MB."
            )
        try:
            return avatar_encode(upload.read())
        except AvatarRejected as exc:
            raise forms.ValidationError(str(exc)) from exc


@admin.register(Persona)
class PersonaAdmin(admin.ModelAdmin):
    form = PersonaForm
    list_display = (
        "avatar_thumbnail",
        "name",
        "slug",
        "is_published",
        "llm_kind",
        "stt_kind",
        "tts_kind",
        "voice",
        "updated_at",
    )
    list_display_links = ("avatar_thumbnail", "name")
    list_filter = ("is_published", "tts_kind", "stt_kind", "llm_kind")
    list_editable = ("is_published",)
    search_fields = ("name", "slug", "description", "system_prompt")
    prepopulated_fields = {"slug": ("name",)}
    readonly_fields = ("avatar_preview", "id", "created_at", "updated_at")
    actions = ["duplicate"]
    fieldsets = (
        (None, {"fields": ("name", "slug", "description", "is_published")}),
        ("Avatar", {"fields": ("avatar_preview", "avatar_upload", "avatar_remove", "avatar")}),
        ("Conversation", {"fields": ("system_prompt", "greeting")}),
        (
            "Engines (empty: the deployment's default)",
            {
                "fields": (
                    "llm_kind",
                    "llm_model",
                    "temperature",
                    "max_tokens",
                    "stt_kind",
                    "tts_kind",
                    "voice",
                )
            },
        ),
        ("Record", {"fields": ("id", "created_at", "updated_at")}),
    )

    # Every staff change goes through the services, which write it through to the
    # context cache: the persona's next turn uses it (the change form and list_editable
    # both save through save_model).
    def save_model(self, request, obj, form, change):
        persona_save(persona=obj)
        # (the list's editable form has neither field: both come back empty)
        png, remove = form.cleaned_data.get("avatar_upload"), form.cleaned_data.get("avatar_remove")
        if png is not None or remove:
            persona_avatar_set(persona=obj, png=png)

    @admin.display(description="Avatar")
    def avatar_thumbnail(self, obj):
        return self._avatar_img(obj, 32)

    @admin.display(description="Avatar shown")
    def avatar_preview(self, obj):
        if obj._state.adding:  # the add form: a new persona has its initials until then
            return "(shown after the first save)"
        return self._avatar_img(obj, 96)

    @staticmethod
    def _avatar_img(obj, px: int):
        url = reverse("persona_avatar", args=[obj.slug])
        version = avatar_version(obj)
        return format_html(
            '<img src="{}?v={}" alt="" width="{}" height="{}" style="border-radius:50%">',
            url, version, px, px,
        )  # fmt: skip

    def delete_model(self, request, obj):
        persona_delete(persona=obj)

    def delete_queryset(self, request, queryset):
        for persona in queryset:
            persona_delete(persona=persona)

    @admin.action(
        description="Duplicate selected personas (as unpublished copies)", permissions=["add"]
    )
    def duplicate(self, request, queryset):
        copies = [persona_duplicate(persona=persona) for persona in queryset]
        self.message_user(
            request, f"Created {len(copies)} cop{'y' if len(copies) == 1 else 'ies'}."
        )
