"""Reading images people upload (image-to-image, inpainting, control images), safely.

Every input image goes through :func:`read_image`: a size limit in bytes before anything is decoded,
only PNG, JPEG and WebP, PIL's decompression-bomb guard (a limit in pixels checked from the header,
before the pixels are decoded), the EXIF orientation applied, and conversion to RGB (CMYK JPEGs,
palettes and alpha included). :func:`fit_to_size` resizes an input whose sides are not what the
request asks for (with a warning for the result), and :func:`read_mask` binarises a mask and resizes it
to its image. Every problem is an :class:`~zimage.errors.ValidationError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError

#: Formats accepted (PIL's names), and how people call them.
ALLOWED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
#: Default upload limit in MiB (``--max-upload-mb``).
DEFAULT_MAX_UPLOAD_MB = 20
#: The most pixels an input may have: 4x the largest output (2048x2048), far below what a decompression
#: bomb asks for, and what PIL checks from the header before it decodes anything.
MAX_INPUT_PIXELS = 4 * 2048 * 2048
#: Mask pixels at or above this grey level (0-255) are repainted, the rest kept.
MASK_THRESHOLD = 128


@dataclass(frozen=True)
class InputImage:
    """A decoded RGB (or L, for masks) PIL image with where it came from and its content hash."""

    image: Any
    name: str
    sha256: str
    original_size: tuple[int, int]


def read_image(data: bytes, name: str, *, max_bytes: int, mode: str = "RGB") -> InputImage:
    """Decode an uploaded image safely. ``data``: the file's bytes; ``name``: for messages only.

    Raises :class:`ValidationError` for a file over ``max_bytes``, a format other than PNG/JPEG/WebP,
    a file that is not an image or is truncated, and an image over :data:`MAX_INPUT_PIXELS`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ValidationError(f"{name} is {len(data) / 2**20:.1f} MB: the limit is {max_bytes / 2**20:.0f} MB "
                              "(--max-upload-mb). Use a smaller file, e.g. a JPEG or a smaller image.")
    if not data:
        raise ValidationError(f"{name} is empty: upload a PNG, JPEG or WebP image.")
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as probe:
            format_name = probe.format
            width, height = probe.size
            if width * height > MAX_INPUT_PIXELS:
                raise ValidationError(f"{name} is {width}x{height} pixels: the limit is {MAX_INPUT_PIXELS:,} pixels "
                                      "(e.g. 4096x4096). Use a smaller image.")
            probe.load()
            image = ImageOps.exif_transpose(probe)  # photos from phones are stored sideways with an EXIF tag
            image = image.convert(mode) if image.mode != mode else image.copy()
    except ValidationError:
        raise
    except Image.DecompressionBombError:
        raise ValidationError(f"{name} declares far more pixels than an image should: refused as a "
                              "decompression bomb.") from None
    except UnidentifiedImageError:
        raise ValidationError(f"{name} is not a PNG, JPEG or WebP image: upload one of those.") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise ValidationError(f"{name} could not be read as an image ({exc}): upload it again or use another "
                              "file.") from None
    if format_name not in ALLOWED_FORMATS:  # pragma: no cover - Image.open(formats=...) refuses them first
        raise ValidationError(f"{name} is a {format_name} file: upload a PNG, JPEG or WebP image.")
    return InputImage(image=image, name=name, sha256=hashlib.sha256(data).hexdigest(), original_size=(width, height))


def fit_to_size(image: Any, width: int, height: int, name: str) -> tuple[Any, str | None]:
    """``image`` resized (Lanczos) to ``width`` x ``height`` if it differs, with the warning to show, or None."""
    if image.size == (width, height):
        return image, None
    from PIL import Image

    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    return resized, (f"{name} is {image.size[0]}x{image.size[1]}: it was resized to {width}x{height}, the requested "
                     "size (sides must be multiples of 16).")


def read_mask(data: bytes, name: str, *, max_bytes: int, size: tuple[int, int]) -> InputImage:
    """Decode a mask (white: repaint, black: keep), binarise it at :data:`MASK_THRESHOLD` and resize it to ``size``.

    A mask with an alpha channel and no grey content uses its alpha (painted strokes on a transparent layer).
    """
    from PIL import Image

    decoded = read_image(data, name, max_bytes=max_bytes, mode="RGBA")
    rgba = decoded.image
    grey = rgba.convert("L")
    alpha = rgba.getchannel("A")
    if grey.getextrema() == (0, 0) and alpha.getextrema()[0] < 255:
        grey = alpha  # strokes painted on a transparent layer: the alpha is the mask
    mask = grey.resize(size, Image.Resampling.NEAREST) if grey.size != size else grey
    mask = mask.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
    if mask.getextrema() == (0, 0):
        raise ValidationError(f"{name} is all black: paint (white) the area to repaint.")
    return InputImage(image=mask, name=name, sha256=decoded.sha256, original_size=decoded.original_size)


def nearest_valid_size(width: int, height: int, *, min_side: int = 256, max_side: int = 2048,
                       multiple: int = 16) -> tuple[int, int]:
    """The output size closest to an input of ``width`` x ``height`` pixels that the model can make.

    Keeps the aspect ratio: scaled down so the longer side is at most ``max_side`` (or up so the shorter side is
    at least ``min_side``), then each side rounded to a multiple of ``multiple`` within [min_side, max_side].
    Used to suggest the size of an image-to-image request from its input.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width={width} and height={height} must be positive")
    scale = min(1.0, max_side / max(width, height))
    if min(width, height) * scale < min_side:
        scale = min_side / min(width, height)

    def side(value: float) -> int:
        return int(min(max_side, max(min_side, round(value * scale / multiple) * multiple)))

    return side(width), side(height)


def read_layers_mask(layers: list[tuple[bytes, str]], *, max_bytes: int, size: tuple[int, int]) -> InputImage:
    """A mask from brush layers (RGBA, strokes on a transparent background, as Gradio's ImageEditor sends them):
    the union of every layer's painted pixels, resized to ``size`` and binarised (white: repaint).

    ``sha256`` is the hash of the binarised mask's pixels (the layers are not files the user has). Raises
    :class:`ValidationError` when nothing was painted, or a layer cannot be read.
    """
    from PIL import Image, ImageChops

    union = None
    for data, name in layers:
        alpha = read_image(data, name, max_bytes=max_bytes, mode="RGBA").image.getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        union = alpha if union is None else ImageChops.lighter(union, alpha)
    if union is None or union.getextrema()[1] < MASK_THRESHOLD:
        raise ValidationError("no area is painted: paint over the part of the image to repaint (the brush in the "
                              "image editor), or send a mask.")
    mask = union.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
    return InputImage(image=mask, name="painted mask", sha256=hashlib.sha256(mask.tobytes()).hexdigest(),
                      original_size=size)


@dataclass(frozen=True)
class PreparedInputs:
    """The images of one request, ready for :class:`zimage.service.GenerationRequest`.

    ``fields``: ``image``, ``mask`` and ``control_image`` (PIL, the request's size) for those given;
    ``inputs``: (file name, sha256, role) per file, for the PNG metadata; ``notes``: warnings for the result
    (an input resized to the request's size).
    """

    fields: dict[str, Any]
    inputs: tuple[tuple[str, str, str], ...]
    notes: tuple[str, ...]


def prepare_inputs(width: int, height: int, *, max_bytes: int, image: tuple[bytes, str] | None = None,
                   mask: tuple[bytes, str] | None = None, control_image: tuple[bytes, str] | None = None,
                   mask_layers: list[tuple[bytes, str]] | None = None) -> PreparedInputs:
    """Read a request's uploaded files, each given as (bytes, file name): the input image and the control image
    fitted to ``width`` x ``height``, the mask (a file, or the painted layers of an image editor) binarised at
    that size. Raises :class:`ValidationError` naming the file and the fix (its ``param``: the file's role)."""
    fields: dict[str, Any] = {}
    inputs: list[tuple[str, str, str]] = []
    notes: list[str] = []
    for role, given in (("image", image), ("control_image", control_image)):
        if given is None:
            continue
        try:
            source = read_image(given[0], given[1], max_bytes=max_bytes)
        except ValidationError as exc:
            raise ValidationError(str(exc), param=role) from None
        fields[role], note = fit_to_size(source.image, width, height, given[1])
        inputs.append((given[1], source.sha256, role))
        notes.extend([note] if note else [])
    try:
        painted = (read_layers_mask(mask_layers, max_bytes=max_bytes, size=(width, height))
                   if mask_layers is not None else None)
        read = (read_mask(mask[0], mask[1], max_bytes=max_bytes, size=(width, height))
                if mask is not None and mask_layers is None else None)  # painted layers take precedence
    except ValidationError as exc:
        raise ValidationError(str(exc), param="mask") from None
    if painted is not None:
        fields["mask"] = painted.image
        inputs.append((painted.name, painted.sha256, "mask"))
    elif read is not None:
        fields["mask"] = read.image
        inputs.append((mask[1], read.sha256, "mask"))
        if read.original_size != (width, height):
            notes.append(f"{mask[1]} is {read.original_size[0]}x{read.original_size[1]}: it was resized to "
                         f"{width}x{height}, the requested size.")
    return PreparedInputs(fields=fields, inputs=tuple(inputs), notes=tuple(notes))
