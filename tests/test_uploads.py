"""Uploaded images: limits, formats, decompression bombs, EXIF orientation, colour modes, masks."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from zimage.errors import ValidationError
from zimage.uploads import MAX_INPUT_PIXELS, fit_to_size, read_image, read_mask

MB = 2**20


def encoded(image: Image.Image, format: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kw)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (what a decompression bomb looks like)."""
    data = encoded(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + patched + data[8 + len(patched):]


def test_png_jpeg_and_webp_are_read_as_rgb_with_their_hash() -> None:
    for format in ("PNG", "JPEG", "WEBP"):
        data = encoded(Image.new("RGB", (64, 48), (200, 10, 10)), format)
        read = read_image(data, f"in.{format.lower()}", max_bytes=MB)
        assert read.image.mode == "RGB" and read.image.size == (64, 48) and len(read.sha256) == 64


def test_a_file_over_the_limit_is_refused_before_decoding() -> None:
    with pytest.raises(ValidationError, match=r"big\.png is 50\.0 MB: the limit is 20 MB \(--max-upload-mb\)"):
        read_image(b"\0" * (50 * MB), "big.png", max_bytes=20 * MB)


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(ValidationError, match=r"bomb\.png declares far more pixels .* decompression bomb"):
        read_image(png_declaring(100_000, 100_000), "bomb.png", max_bytes=MB)  # PIL's own guard
    with pytest.raises(ValidationError, match=r"huge\.png is 5000x5000 pixels: the limit is"):
        read_image(png_declaring(5000, 5000), "huge.png", max_bytes=MB)  # below PIL's guard, above ours
    assert 2048 * 2048 < MAX_INPUT_PIXELS


def test_a_text_file_named_png_and_other_formats_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"notes\.png is not a PNG, JPEG or WebP image"):
        read_image(b"just some text, not an image\n", "notes.png", max_bytes=MB)
    with pytest.raises(ValidationError, match="is not a PNG, JPEG or WebP image"):
        read_image(encoded(Image.new("RGB", (8, 8)), "BMP"), "old.bmp", max_bytes=MB)
    with pytest.raises(ValidationError, match="could not be read"):
        read_image(encoded(Image.new("RGB", (64, 64)), "PNG")[:-40], "cut.png", max_bytes=MB)


def test_a_cmyk_jpeg_becomes_rgb() -> None:
    read = read_image(encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), "print.jpg", max_bytes=MB)
    assert read.image.mode == "RGB"
    red, green, blue = read.image.getpixel((16, 16))
    assert red > 200 and green < 60 and blue < 60  # CMYK (0, 1, 1, 0) is red


def test_the_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    read = read_image(encoded(image, "PNG", exif=exif), "phone.png", max_bytes=MB)
    assert read.image.size == (40, 80)


def test_an_input_of_another_size_is_resized_with_a_warning() -> None:
    image = Image.new("RGB", (500, 300))
    resized, warning = fit_to_size(image, 512, 304, "in.png")
    assert resized.size == (512, 304) and "in.png is 500x300: it was resized to 512x304" in warning
    same, none = fit_to_size(resized, 512, 304, "in.png")
    assert same is resized and none is None


def test_a_mask_is_binarised_and_resized_to_its_image() -> None:
    mask = Image.new("L", (100, 50), 0)
    mask.paste(200, (0, 0, 50, 50))  # the left half, light grey
    mask.paste(100, (50, 0, 100, 50))  # the right half, dark grey: below the threshold
    read = read_mask(encoded(mask, "PNG"), "mask.png", max_bytes=MB, size=(200, 100))
    assert read.image.size == (200, 100) and set(read.image.getdata()) == {0, 255}
    assert read.image.getpixel((10, 10)) == 255 and read.image.getpixel((190, 90)) == 0


def test_strokes_on_a_transparent_layer_are_a_mask_and_an_empty_mask_is_refused() -> None:
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((0, 0, 0, 255), (0, 0, 32, 64))  # black strokes, opaque, on transparency
    read = read_mask(encoded(layer, "PNG"), "strokes.png", max_bytes=MB, size=(64, 64))
    assert read.image.getpixel((5, 5)) == 255 and read.image.getpixel((60, 5)) == 0
    with pytest.raises(ValidationError, match="all black: paint"):
        read_mask(encoded(Image.new("L", (64, 64), 0), "PNG"), "empty.png", max_bytes=MB, size=(64, 64))


@pytest.mark.parametrize("size, expected", [
    ((330, 250), (336, 256)),       # rounded to multiples of 16
    ((1024, 1024), (1024, 1024)),   # already valid
    ((4000, 3000), (2048, 1536)),   # too large: scaled down, aspect kept
    ((100, 80), (320, 256)),        # too small: scaled up to the minimum side
    ((3000, 100), (2048, 256)),     # extreme panorama: each side clamped
])
def test_nearest_valid_size_keeps_the_aspect_within_the_limits(size, expected) -> None:
    from zimage.uploads import nearest_valid_size

    assert nearest_valid_size(*size) == expected


def test_a_mask_from_painted_layers_is_their_union() -> None:
    from zimage.uploads import read_layers_mask

    first, second = Image.new("RGBA", (64, 64), (0, 0, 0, 0)), Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    first.paste((255, 255, 255, 255), (0, 0, 16, 16))
    second.paste((10, 10, 10, 200), (64, 64, 128, 128))  # a second layer at twice the size, any colour
    mask = read_layers_mask([(encoded(first, "PNG"), "layer 1"), (encoded(second, "PNG"), "layer 2")],
                            max_bytes=MB, size=(32, 32)).image
    assert mask.size == (32, 32) and mask.mode == "L"
    assert mask.getpixel((2, 2)) == 255 and mask.getpixel((20, 20)) == 255 and mask.getpixel((20, 2)) == 0
    assert set(mask.getdata()) == {0, 255}


def test_an_editor_with_nothing_painted_is_refused() -> None:
    from zimage.uploads import read_layers_mask

    empty = encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG")
    for layers in ([], [(empty, "layer 1")]):
        with pytest.raises(ValidationError, match="no area is painted"):
            read_layers_mask(layers, max_bytes=MB, size=(64, 64))
