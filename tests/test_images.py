"""Every kind of bad or unusual image gives 8-bit RGB or one clear error."""
import io

import numpy as np
import pytest
from PIL import Image

from edge.images import ImageError, decode_image, load_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_real_cell_decodes_to_rgb8(cell_files):
    rgb = load_image(cell_files[0])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_modes_become_rgb8(cell_files, mode):
    src = Image.open(cell_files[0]).convert("RGB")
    rgb = decode_image(_png(src.convert(mode)) if mode != "CMYK" else _jpeg(src.convert(mode)))
    assert rgb.shape == (src.height, src.width, 3) and rgb.dtype == np.uint8


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_16bit_keeps_the_top_8_bits():
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    rgb = decode_image(_png(Image.fromarray(arr)))
    assert rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb[..., 0], (arr >> 8).astype(np.uint8))


def test_a_dark_16bit_image_stays_dark():
    """Scaled by the bit depth, not stretched to its own maximum."""
    arr = np.full((32, 32), 200 * 256, np.uint16)  # 200/255 of a 16-bit range would be bright; this is 200*256
    arr[:16] = 40 * 256
    rgb = decode_image(_png(Image.fromarray(arr)))
    assert rgb[0, 0, 0] == 40 and rgb[-1, 0, 0] == 200
    dim = decode_image(_png(Image.fromarray(np.full((8, 8), 255, np.uint16))))  # 255 of 65535: nearly black
    assert dim.max() == 0


def test_float_images_are_read_as_0_to_1():
    arr = np.full((8, 8), 0.5, np.float32)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, format="TIFF")
    assert decode_image(buf.getvalue())[0, 0, 0] == 128


def test_rgba_transparency_becomes_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode_image(_png(img)) == 255).all()


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(p)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("these are not pixels")
    with pytest.raises(ImageError, match="not an image"):
        load_image(p)


def test_truncated_image(cell_files, tmp_path):
    data = _png(Image.open(cell_files[0]))
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(p)


def test_corrupt_bytes_in_the_middle(cell_files, tmp_path):
    data = bytearray(_png(Image.open(cell_files[0])))
    data[60:400] = b"\x00" * 340
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError):
        load_image(p)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png(Image.new("1", (9000, 9000)))  # 81 Mpx, a few kB on disk
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="too large"):
        decode_image(bomb, "bomb.png")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_as_pillow_shows_it(cell_files, orientation, fmt):
    from PIL import ImageOps
    src = Image.open(cell_files[0]).convert("RGB").crop((0, 0, 90, 60))  # not square: a turn shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    src.save(buf, format=fmt, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert np.array_equal(decode_image(buf.getvalue()), expected)
