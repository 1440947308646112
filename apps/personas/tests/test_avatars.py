"""Persona avatars (apps/personas/avatars.py): uploads in the admin are checked,
re-encoded and served as PNG; a persona without one gets its initials."""

import io
import struct
import zlib

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from apps.accounts.tests.factories import UserFactory
from apps.conversations.models import Conversation

from ..avatars import AVATAR_PX, AvatarRejected, avatar_encode, initials, initials_png
from ..models import Persona, PersonaAvatar
from .factories import PersonaFactory


def image_bytes(fmt: str, size=(600, 400), colour=(200, 30, 30), **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt, **save)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# --- Encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_accepted_format_becomes_a_square_png_of_the_image(fmt):
    png = avatar_encode(image_bytes(fmt, colour=(200, 30, 30)))

    image = decoded(png)
    assert (image.format, image.size, image.mode) == ("PNG", (AVATAR_PX, AVATAR_PX), "RGBA")
    r, g, b, a = image.getpixel((AVATAR_PX // 2, AVATAR_PX // 2))
    assert r > 150 and g < 80 and b < 80 and a == 255  # the upload's red, not a placeholder


def test_nothing_but_pixels_is_kept_from_the_upload():
    exif = Image.Exif()
    exif[0x010E] = "secret description"  # ImageDescription
    exif[0x0112] = 6  # Orientation: rotated, applied before cropping
    upload = image_bytes("JPEG", size=(400, 200), exif=exif.tobytes())
    assert b"secret description" in upload

    png = avatar_encode(upload)

    assert b"secret description" not in png
    image = decoded(png)
    assert not image.getexif() and not image.info.get("exif")


def test_an_animated_gif_keeps_its_first_frame_only():
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((0, 0, 255), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)

    image = decoded(avatar_encode(out.getvalue()))

    assert getattr(image, "n_frames", 1) == 1
    r, g, b, _ = image.getpixel((10, 10))
    assert b > 200 and g < 60


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello, I am a text file", "not an image that can be read"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
         "not an image that can be read"),
        (image_bytes("BMP"), r"Upload a PNG, JPEG, WebP or GIF image \(this one is BMP\)\."),
        (image_bytes("PNG")[:300], "damaged or cut short"),
        (huge_png_header(5000, 5000), "5000 × 5000 pixels; the most allowed is 4096 × 4096"),
        (huge_png_header(20_000, 20_000), "far too many pixels; the most allowed is 4096 × 4096"),
    ],
    ids=["text", "svg", "bmp", "truncated", "too-many-pixels", "pixel-bomb"],
)  # fmt: skip
def test_what_cannot_be_an_avatar_is_refused_with_the_reason(data, message):
    with pytest.raises(AvatarRejected, match=message):
        avatar_encode(data)


def test_an_upload_over_the_size_limit_is_refused_before_it_is_decoded(settings):
    settings.AVATAR_UPLOAD_MAX_BYTES = 1000
    with pytest.raises(AvatarRejected, match="the most allowed is 0.0 MB"):
        avatar_encode(b"\x89PNG" + bytes(2000))


def test_initials_and_their_image():
    assert [initials(n) for n in ("Ada Lovelace", "rex", "Captain Rex the Bold", "  ", "ø")] == [
        "AL", "R", "CB", "?", "Ø",
    ]  # fmt: skip
    ada = decoded(initials_png("Ada"))
    assert (ada.format, ada.size) == ("PNG", (AVATAR_PX, AVATAR_PX))
    assert ada.getpixel((0, 0))[3] == 0  # round: the corners are clear
    centre = [ada.getpixel((x, AVATAR_PX // 2)) for x in range(80, 176)]
    assert any(pixel[:3] == (255, 255, 255) for pixel in centre)  # white letters drawn
    assert initials_png("Ada") == initials_png("Ada")  # the same on every pod


# --- The admin -------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, db):
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def change_form(persona: Persona, **extra) -> dict:
    data = {
        field: getattr(persona, field)
        for field in (
            "name",
            "slug",
            "avatar",
            "description",
            "system_prompt",
            "greeting",
            "voice",
            "llm_kind",
            "llm_model",
            "temperature",
            "max_tokens",
            "stt_kind",
            "tts_kind",
        )  # fmt: skip
    }
    data["is_published"] = "on" if persona.is_published else ""
    return data | extra


def test_staff_upload_an_avatar_in_the_admin_and_the_pages_serve_it(staff_client):
    persona = PersonaFactory(slug="ada", is_published=True)
    url = f"/admin/personas/persona/{persona.pk}/change/"
    upload = SimpleUploadedFile("face.jpg", image_bytes("JPEG"), content_type="image/jpeg")

    response = staff_client.post(url, change_form(persona, avatar_upload=upload))

    assert response.status_code == 302, response.content.decode()[:3000]
    stored = bytes(PersonaAvatar.objects.get(persona=persona).png)
    assert decoded(stored).size == (AVATAR_PX, AVATAR_PX)
    served = staff_client.get("/personas/ada/avatar.png?v=1")
    assert served.status_code == 200 and served.content == stored
    assert served["Content-Type"] == "image/png"
    assert served["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in served["Content-Security-Policy"]
    assert "max-age=86400" in served["Cache-Control"]
    gallery = staff_client.get("/").content.decode()
    version = int(Persona.objects.get(pk=persona.pk).updated_at.timestamp())
    assert f'src="/personas/ada/avatar.png?v={version}"' in gallery

    # and removing it brings the initials back
    response = staff_client.post(url, change_form(persona, avatar_remove="on"))
    assert response.status_code == 302
    assert not PersonaAvatar.objects.filter(persona=persona).exists()
    assert staff_client.get("/personas/ada/avatar.png").content == initials_png(persona.name)


def test_a_bad_upload_is_a_form_error_and_nothing_of_the_edit_is_saved(staff_client):
    persona = PersonaFactory(slug="ada", name="Ada")
    url = f"/admin/personas/persona/{persona.pk}/change/"
    upload = SimpleUploadedFile("face.png", b"not an image", content_type="image/png")

    response = staff_client.post(url, change_form(persona, name="Renamed", avatar_upload=upload))

    assert response.status_code == 200  # the form again, with the reason
    assert "The file is not an image that can be read." in response.content.decode()
    assert 'value="Renamed"' in response.content.decode()  # what was typed is kept
    assert Persona.objects.get(pk=persona.pk).name == "Ada"
    assert not PersonaAvatar.objects.exists()


def test_an_oversized_upload_is_refused_without_being_read(staff_client, settings):
    settings.AVATAR_UPLOAD_MAX_BYTES = 10_000
    persona = PersonaFactory(slug="ada")
    upload = SimpleUploadedFile("big.png", image_bytes("PNG", size=(2000, 2000), colour=None))

    response = staff_client.post(
        f"/admin/personas/persona/{persona.pk}/change/", change_form(persona, avatar_upload=upload)
    )

    assert response.status_code == 200
    assert "the most allowed is 0.0 MB" in response.content.decode()
    assert not PersonaAvatar.objects.exists()


# --- Serving ---------------------------------------------------------------------------


def test_a_persona_without_an_upload_shows_its_initials(client, db):
    PersonaFactory(slug="rex", name="Captain Rex", is_published=True)

    response = client.get("/personas/rex/avatar.png")

    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert response.content == initials_png("Captain Rex")
    assert response["Cache-Control"] == "no-cache"  # unversioned: ask again each time
    again = client.get("/personas/rex/avatar.png", HTTP_IF_NONE_MATCH=response["ETag"])
    assert again.status_code == 304 and again.content == b""


def test_a_drafts_avatar_is_shown_only_to_staff_and_to_those_who_talked_with_it(client, db):
    draft = PersonaFactory(slug="draft", is_published=False)
    assert client.get("/personas/draft/avatar.png").status_code == 404
    assert client.get("/personas/nobody/avatar.png").status_code == 404
    stranger = UserFactory()
    client.force_login(stranger)
    assert client.get("/personas/draft/avatar.png").status_code == 404
    Conversation.objects.create(user=stranger, persona=draft)
    assert client.get("/personas/draft/avatar.png").status_code == 200
    client.force_login(UserFactory(is_staff=True))
    assert client.get("/personas/draft/avatar.png").status_code == 200
    assert client.post("/personas/draft/avatar.png").status_code == 405
