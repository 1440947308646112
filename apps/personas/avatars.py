"""Persona avatars as images. Staff upload one in the admin; it is checked (type,
size, pixels), decoded, and re-encoded here as a square PNG of AVATAR_PX, so no
byte of the upload (metadata, a second frame, a polyglot's payload) is ever served.
The PNG is kept in the database (PersonaAvatar), so every web pod serves it with no
shared volume. A persona without one gets an initials image drawn here. Pages show
them through views.avatar, always as image/png.

Emoji avatars were dropped from the pages: on a machine without a colour emoji
font they render as empty boxes."""

from __future__ import annotations

import io
import zlib
from functools import lru_cache

from django.conf import settings
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

AVATAR_PX = 256
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF"}
MAX_PIXELS = 4096 * 4096  # the most an upload may decode to
# Background colours of initials images, picked by the persona's name (white text on each).
PALETTE = ("#2f6f8f", "#7a4f9a", "#9a4f4f", "#3f7f4f", "#8a6a2a", "#4f5f9a", "#8f3f6f")


class AvatarRejected(ValueError):
    """An upload that cannot be an avatar; the message says why, for the admin form."""


def avatar_encode(data: bytes) -> bytes:
    """The upload as a AVATAR_PX square PNG (centre-cropped, first frame, EXIF
    orientation applied, nothing else kept). Raises AvatarRejected."""
    limit = settings.AVATAR_UPLOAD_MAX_BYTES
    if len(data) > limit:
        raise AvatarRejected(
            f"The image is {len(data) / 1e6:.1f} MB; the most allowed is {limit / 1e6:.1f} MB."
        )
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format or ""
            if kind not in ACCEPTED_FORMATS:
                raise AvatarRejected(
                    f"Upload a PNG, JPEG, WebP or GIF image (this one is {kind or 'unknown'})."
                )
            width, height = probe.size
            if width * height > MAX_PIXELS:
                raise AvatarRejected(
                    f"The image is {width} × {height} pixels; the most allowed is 4096 × 4096."
                )
            probe.verify()  # the whole file: a truncated or corrupt one fails here
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            upright = ImageOps.exif_transpose(image).convert("RGBA")
            square = ImageOps.fit(upright, (AVATAR_PX, AVATAR_PX), Image.Resampling.LANCZOS)
    except AvatarRejected:
        raise
    except Image.DecompressionBombError as exc:  # refused by Pillow as it opens it
        raise AvatarRejected(
            "The image has far too many pixels; the most allowed is 4096 × 4096."
        ) from exc
    except UnidentifiedImageError as exc:
        raise AvatarRejected("The file is not an image that can be read.") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's decode errors
        raise AvatarRejected("The image is damaged or cut short; it could not be read.") from exc
    return _png(square)


def avatar_version(persona) -> int:
    """Part of the avatar's URL (`?v=`): it changes whenever the persona is saved,
    so a browser that keeps the image a day still sees a new one at once."""
    return int(persona.updated_at.timestamp()) if persona.updated_at else 0


def initials(name: str) -> str:
    """'Ada Lovelace' -> 'AL', 'rex' -> 'R'; '?' when the name has no letter."""
    words = ["".join(ch for ch in word if ch.isalnum()) for word in name.split()]
    letters = [word[0].upper() for word in words if word]
    if not letters:
        return "?"
    return letters[0] + (letters[-1] if len(letters) > 1 else "")


@lru_cache(maxsize=512)
def initials_png(name: str) -> bytes:
    """A AVATAR_PX PNG: the name's initials, white on a colour picked by the name
    (the same name gives the same image on every pod)."""
    colour = PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]
    image = Image.new("RGBA", (AVATAR_PX, AVATAR_PX), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((0, 0, AVATAR_PX - 1, AVATAR_PX - 1), fill=colour)
    font = ImageFont.load_default(size=AVATAR_PX * 0.42)  # Pillow's own font: no system font
    centre = AVATAR_PX / 2
    draw.text((centre, centre), initials(name), fill="white", font=font, anchor="mm")
    return _png(image)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()
