"""Tests for serve_app.images: every input is built in memory with Pillow."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from serve_app.api.input_images import decode_input_image, decode_mask, describe, round_to_multiple
from serve_app.errors import InvalidRequest
from serve_app.messages import InputImage
from serve_app.settings import Limits

LIMITS = Limits()
FIELD = "initImage"


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    raw = random.Random(seed).randbytes(size[0] * size[1] * 3)
    return Image.frombytes("RGB", size, raw)


def opened(image: InputImage) -> Image.Image:
    result = Image.open(io.BytesIO(image.png))
    assert result.format == "PNG"
    assert result.size == (image.width, image.height)
    return result


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` with no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rejected(value: object, field: str = FIELD, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as info:
        decode_input_image(value, field, limits)
    assert info.value.message.startswith(f"{field}: ")
    return info.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_decode_to_rgb_png_of_the_same_size(fmt: str) -> None:
    image = decode_input_image(data_uri(encode(noise((40, 24)), fmt)), FIELD, LIMITS)
    assert (image.width, image.height) == (40, 24)
    assert opened(image).mode == "RGB"


def test_data_uri_and_bare_base64_give_the_same_image() -> None:
    data = encode(noise((16, 16)), "PNG")
    assert decode_input_image(data_uri(data), FIELD, LIMITS) == decode_input_image(
        b64(data), FIELD, LIMITS
    )


def test_whitespace_and_newlines_in_the_base64_are_tolerated() -> None:
    data = encode(noise((32, 32)), "JPEG")
    wrapped = base64.encodebytes(data).decode("ascii")
    assert "\n" in wrapped
    image = decode_input_image(f"  data:image/jpeg;base64,\n{wrapped}\n", FIELD, LIMITS)
    assert (image.width, image.height) == (32, 32)


@pytest.mark.parametrize("mime", ["image/jpg", "IMAGE/JPEG", "image/webp"])
def test_data_uri_accepts_jpg_alias_and_any_case(mime: str) -> None:
    image = decode_input_image(data_uri(encode(noise((8, 8)), "JPEG"), mime), FIELD, LIMITS)
    assert image.width == 8


def test_exif_orientation_6_rotates_the_image() -> None:
    source = Image.new("RGB", (40, 20), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; display by turning 90 degrees clockwise
    data = encode(source, "JPEG", exif=exif.tobytes(), quality=95)
    image = decode_input_image(b64(data), FIELD, LIMITS)
    assert (image.width, image.height) == (20, 40)
    red, _, blue = opened(image).getpixel((10, 5))  # the left half is now on top
    assert red > 200 and blue < 50


def test_rgba_is_flattened_onto_white() -> None:
    source = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    source.putpixel((0, 0), (255, 0, 0, 255))
    result = opened(decode_input_image(b64(encode(source, "PNG")), FIELD, LIMITS))
    assert result.mode == "RGB"
    assert result.getpixel((5, 5)) == (255, 255, 255)
    assert result.getpixel((0, 0)) == (255, 0, 0)


def test_palette_transparency_is_flattened_onto_white() -> None:
    source = Image.new("P", (4, 4), 0)
    source.putpalette([0, 0, 0, 0, 255, 0])
    source.putpixel((0, 0), 1)
    data = encode(source, "PNG", transparency=0)
    result = opened(decode_input_image(b64(data), FIELD, LIMITS))
    assert result.getpixel((2, 2)) == (255, 255, 255)
    assert result.getpixel((0, 0)) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    source = Image.new("I;16", (4, 4), 32896)  # mid grey in 16 bits
    result = opened(decode_input_image(b64(encode(source, "PNG")), FIELD, LIMITS))
    assert result.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("value", [None, 42, b"iVBORw0KGgo=", "", "   \n"])
def test_missing_or_non_string_value_is_rejected(value: object) -> None:
    assert "non-empty string" in rejected(value)


@pytest.mark.parametrize("value", ["not base64!!", "data:image/png;base64,@@@@", "abcde"])
def test_invalid_base64_is_rejected(value: str) -> None:
    assert "not valid base64" in rejected(value)


def test_oversized_input_is_rejected_before_decoding_the_base64() -> None:
    limits = Limits(max_input_bytes=1000)
    # Invalid base64: a message about size shows the length was checked first.
    assert "over the limit of 1000 bytes" in rejected("!!!!" * 400, limits=limits)
    assert "over the limit of 1000 bytes" in rejected("!!!!" * 100_000, limits=limits)


def test_input_at_the_byte_limit_is_accepted() -> None:
    data = encode(noise((8, 8)), "PNG")
    image = decode_input_image(b64(data), FIELD, Limits(max_input_bytes=len(data)))
    assert image.width == 8


def test_bytes_that_are_not_an_image_are_rejected() -> None:
    message = rejected(b64(b"just some text, not an image at all"))
    assert "not a PNG, JPEG or WebP image" in message


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_are_rejected_naming_the_accepted_ones(fmt: str, name: str) -> None:
    message = rejected(b64(encode(noise((8, 8)), fmt)), field="styleImage")
    assert f"{name} images are not accepted" in message
    assert "PNG, JPEG or WebP" in message


def test_data_uri_of_another_type_is_rejected() -> None:
    message = rejected(data_uri(encode(noise((8, 8)), "GIF"), "image/gif"))
    assert "'image/gif' is not accepted" in message


def test_data_uri_without_base64_is_rejected() -> None:
    assert "must be base64-encoded" in rejected("data:image/png,%89PNG")


def test_pixel_count_over_the_limit_is_rejected() -> None:
    message = rejected(b64(encode(noise((20, 10)), "PNG")), limits=Limits(max_input_pixels=199))
    assert "20x10 (200 pixels)" in message
    assert "limit of 199 pixels" in message


def test_decompression_bomb_is_rejected_from_the_header_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 100 million pixels of zeros: a few KB compressed, over Pillow's own bomb warning.
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(bomb) < 100_000

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    max_pixels = Image.MAX_IMAGE_PIXELS
    assert "too many pixels" in rejected(b64(bomb), limits=Limits(max_input_pixels=10**6))
    assert max_pixels == Image.MAX_IMAGE_PIXELS


def test_pixel_limit_is_checked_from_the_header_alone() -> None:
    # No pixel data at all: decoding would report truncation, not the size.
    message = rejected(b64(png_header_only(5000, 4000)), limits=Limits(max_input_pixels=10**6))
    assert "5000x4000 (20000000 pixels), over the limit of 1000000 pixels" in message


def test_decompression_bomb_is_rejected_even_under_a_generous_limit() -> None:
    # 400 million pixels: Pillow refuses it in the header, whatever our own limit says.
    header = png_header_only(20_000, 20_000)
    message = rejected(b64(header), limits=Limits(max_input_pixels=10**12))
    assert f"too many pixels (the limit is {Image.MAX_IMAGE_PIXELS})" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image_is_rejected(fmt: str) -> None:
    data = encode(noise((64, 64)), fmt)
    assert "truncated or corrupt" in rejected(b64(data[: len(data) // 2]))


def test_header_without_pixel_data_is_rejected() -> None:
    assert "truncated or corrupt" in rejected(b64(png_header_only(16, 16)))


def test_errors_name_the_field_they_are_about() -> None:
    assert rejected("@@", field="contentImage").startswith("contentImage: ")
    with pytest.raises(InvalidRequest, match=r"^mask: "):
        decode_mask("@@", "mask", LIMITS, InputImage(b"", 8, 8))


def target(width: int, height: int) -> InputImage:
    return decode_input_image(b64(encode(noise((width, height)), "PNG")), "image", LIMITS)


def test_mask_is_resized_to_the_image_and_thresholded() -> None:
    source = Image.new("L", (32, 16), 0)
    source.paste(255, (0, 0, 16, 16))  # left half: repaint
    source.paste(100, (16, 0, 32, 16))  # right half: grey, below the threshold
    mask = decode_mask(b64(encode(source, "PNG")), "mask", LIMITS, target(64, 32))
    result = opened(mask)
    assert result.mode == "L"
    assert result.size == (64, 32)
    assert {value for _, value in result.getcolors()} == {0, 255}
    assert result.getpixel((8, 8)) == 255
    assert result.getpixel((56, 8)) == 0


def test_mask_with_aspect_ratio_within_one_percent_is_accepted() -> None:
    source = Image.new("RGB", (100, 100), (255, 255, 255))
    mask = decode_mask(b64(encode(source, "PNG")), "mask", LIMITS, target(101, 100))
    assert (mask.width, mask.height) == (101, 100)


def test_mask_with_another_aspect_ratio_is_rejected() -> None:
    source = Image.new("L", (32, 32), 255)
    with pytest.raises(InvalidRequest) as info:
        decode_mask(b64(encode(source, "PNG")), "mask", LIMITS, target(64, 32))
    assert info.value.message.startswith("mask: ")
    assert "32x32" in info.value.message and "64x32" in info.value.message


def test_entirely_black_mask_is_rejected() -> None:
    source = Image.new("L", (16, 16), 0)
    with pytest.raises(InvalidRequest, match=r"^mask: .*entirely black; white marks"):
        decode_mask(b64(encode(source, "PNG")), "mask", LIMITS, target(16, 16))


def test_alpha_only_mask_is_read_from_its_alpha() -> None:
    source = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    source.paste((0, 0, 0, 255), (0, 0, 8, 16))  # a black stroke on a clear layer
    result = opened(decode_mask(b64(encode(source, "PNG")), "mask", LIMITS, target(16, 16)))
    assert result.getpixel((2, 2)) == 255
    assert result.getpixel((12, 2)) == 0


def test_coloured_transparent_mask_is_composited_onto_black() -> None:
    source = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    source.paste((255, 255, 255, 255), (0, 0, 8, 16))
    source.putpixel((15, 15), (0, 0, 0, 255))  # non-uniform colour
    result = opened(decode_mask(b64(encode(source, "PNG")), "mask", LIMITS, target(16, 16)))
    assert result.getpixel((2, 2)) == 255
    assert result.getpixel((12, 2)) == 0


def test_round_to_multiple_rounds_down_but_not_below_the_multiple() -> None:
    assert round_to_multiple(513, 775) == (512, 768)
    assert round_to_multiple(512, 512) == (512, 512)
    assert round_to_multiple(5, 3) == (8, 8)
    assert round_to_multiple(130, 100, multiple=64) == (128, 64)
    with pytest.raises(ValueError):
        round_to_multiple(8, 8, multiple=0)


def test_describe_is_short_and_json_safe() -> None:
    image = InputImage(png=b"x" * 123, width=64, height=32)
    assert describe(image) == {"width": 64, "height": 32, "bytes": 123}
