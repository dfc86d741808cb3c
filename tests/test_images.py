"""open_rgb: every PIL mode to RGB, EXIF orientation, multi-frame, and readable errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from extract.registry.images import ImageError, is_image_file, open_rgb

W, H = 24, 16
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _halves(mode: str, left, right) -> Image.Image:
    """A W x H image in `mode`: left half `left`, right half `right`."""
    im = Image.new(mode, (W, H), left)
    im.paste(Image.new(mode, (W // 2, H), right), (W // 2, 0))
    return im


def _pix(im: Image.Image, side: str) -> np.ndarray:
    x = W // 4 if side == "left" else 3 * W // 4
    return np.asarray(im)[H // 2, x].astype(int)


def _save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def _p_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (W, H), 0)
    im.putpalette([10, 200, 30] + [200, 20, 40] + [0, 0, 0] * 254)
    im.paste(1, (W // 2, 0, W, H))
    if transparent:
        im.info["transparency"] = 1
    return im


# mode name -> (image factory, file name, expected left RGB, expected right RGB, tolerance)
CASES = {
    "1": (lambda: _halves("1", 0, 1), "a.png", (0, 0, 0), WHITE, 0),
    "L": (lambda: _halves("L", 30, 220), "a.png", (30,) * 3, (220,) * 3, 0),
    "LA": (lambda: _halves("LA", (90, 255), (90, 0)), "a.png", (90,) * 3, WHITE, 0),
    "P": (lambda: _p_image(False), "a.png", (10, 200, 30), (200, 20, 40), 0),
    "P+transparency": (lambda: _p_image(True), "a.png", (10, 200, 30), WHITE, 0),
    "P gif": (lambda: _p_image(False), "a.gif", (10, 200, 30), (200, 20, 40), 0),
    "RGBA": (lambda: _halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)), "a.png", RED, WHITE, 0),
    "RGBA half alpha": (lambda: _halves("RGBA", (0, 0, 255, 128), (0, 0, 255, 255)), "a.png",
                        (127, 127, 255), BLUE, 1),
    "RGBA webp": (lambda: _halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)), "a.webp", RED, WHITE, 12),
    "CMYK jpeg": (lambda: _halves("CMYK", (0, 255, 255, 0), (255, 255, 0, 0)), "a.jpg", RED, BLUE, 12),
    "CMYK tiff": (lambda: _halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), "a.tif", RED, (0, 0, 0), 0),
    "I;16 png": (lambda: Image.fromarray(np.where(np.arange(W) < W // 2, 0, 65535)
                                         .astype(np.uint16)[None].repeat(H, 0)), "a.png",
                 (0, 0, 0), WHITE, 0),
    "I;16 mid": (lambda: Image.fromarray(np.full((H, W), 257 * 100, np.uint16)), "a.png",
                 (100,) * 3, (100,) * 3, 0),
    "I tiff": (lambda: Image.fromarray(np.where(np.arange(W) < W // 2, 1000, 65535)
                                       .astype(np.int32)[None].repeat(H, 0)), "a.tif",
               (4, 4, 4), WHITE, 0),
    "F tiff": (lambda: Image.fromarray(np.where(np.arange(W) < W // 2, 0.0, 0.5)
                                       .astype(np.float32)[None].repeat(H, 0)), "a.tif",
               (0, 0, 0), (128,) * 3, 0),
    "RGB bmp": (lambda: _halves("RGB", RED, BLUE), "a.BMP", RED, BLUE, 0),
    "RGB ppm": (lambda: _halves("RGB", RED, BLUE), "a.ppm", RED, BLUE, 0),
    "L pgm": (lambda: _halves("L", 0, 255), "a.pgm", (0, 0, 0), WHITE, 0),
    "YCbCr jpeg": (lambda: _halves("RGB", RED, BLUE).convert("YCbCr"), "a.jpeg", RED, BLUE, 12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_becomes_rgb(tmp_path, case):
    make, name, left, right, tol = CASES[case]
    src = make()
    path = _save(src, tmp_path / name)
    im = open_rgb(path)
    assert im.mode == "RGB"
    assert im.size == (W, H)
    np.testing.assert_allclose(_pix(im, "left"), left, atol=tol)
    np.testing.assert_allclose(_pix(im, "right"), right, atol=tol)


def test_saved_modes_are_the_ones_under_test(tmp_path):
    """Guard against PIL silently converting on save, which would make the cases above vacuous."""
    for case, expect in [("I;16 png", "I;16"), ("CMYK jpeg", "CMYK"), ("CMYK tiff", "CMYK"),
                         ("F tiff", "F"), ("I tiff", "I"), ("LA", "LA"), ("1", "1"),
                         ("P+transparency", "P"), ("RGBA webp", "RGBA")]:
        make, name, *_ = CASES[case]
        path = _save(make(), tmp_path / f"{len(expect)}{name}")
        with Image.open(path) as im:
            assert im.mode == expect, case
    with Image.open(_save(_p_image(True), tmp_path / "t.png")) as im:
        assert "transparency" in im.info


@pytest.mark.parametrize("orientation, size, top, bottom", [
    (6, (H, W), RED, BLUE),   # rotate 90 clockwise to display: left half ends up on top
    (8, (H, W), BLUE, RED),   # rotate 90 anticlockwise: right half ends up on top
    (3, (W, H), None, None),  # rotate 180: left/right swap
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, top, bottom):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    _halves("RGB", RED, BLUE).save(path, exif=exif.tobytes(), quality=95)
    im = open_rgb(path)
    assert im.size == size
    a = np.asarray(im).astype(int)
    if top is None:
        np.testing.assert_allclose(_pix(im, "left"), BLUE, atol=12)
        np.testing.assert_allclose(_pix(im, "right"), RED, atol=12)
    else:
        np.testing.assert_allclose(a[W // 4, H // 2], top, atol=12)
        np.testing.assert_allclose(a[3 * W // 4, H // 2], bottom, atol=12)


def test_multi_frame_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (W, H), c) for c in (RED, BLUE, (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    np.testing.assert_array_equal(_pix(open_rgb(path), "left"), RED)
    tif = tmp_path / "pages.tiff"
    frames[1].save(tif, save_all=True, append_images=[frames[0]])
    np.testing.assert_array_equal(_pix(open_rgb(tif), "right"), BLUE)


def _jpeg_bytes(tmp_path) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path / "ok.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


def _png_bytes(tmp_path) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path / "ok.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", lambda t: b"", "empty file"),
    ("text.jpg", lambda t: b"this is not an image\n" * 10, "not an image file"),
    ("random.png", lambda t: np.random.default_rng(1).bytes(4096), "not an image file"),
    ("cut.jpg", lambda t: _jpeg_bytes(t)[: len(_jpeg_bytes(t)) // 2], "truncated image data"),
    ("cut.png", lambda t: _png_bytes(t)[: len(_png_bytes(t)) // 2], "truncated image data"),
    ("garbled.jpg", lambda t: _jpeg_bytes(t)[:200] + b"\xff\xd9", None),
])
def test_unreadable_files_raise_image_error(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content(tmp_path))
    with pytest.raises(ImageError) as err:
        open_rgb(path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value)
    if reason is not None:
        assert err.value.reason == reason
    else:
        assert err.value.reason and "\n" not in err.value.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        open_rgb(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError) as err:
        open_rgb(tmp_path / "dir.jpg")
    assert err.value.path == str(tmp_path / "dir.jpg")


@pytest.mark.parametrize("pixels", [40 * 40, 100 * 100])  # warning zone (> limit) and error zone (> 2x)
def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch, pixels):
    side = int(pixels ** 0.5)
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side), RED).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        open_rgb(path)


def test_result_is_detached_from_the_file(tmp_path):
    path = _save(_halves("RGB", RED, BLUE), tmp_path / "a.png")
    im = open_rgb(path)
    path.unlink()
    assert np.asarray(im).shape == (H, W, 3)


def test_is_image_file():
    assert is_image_file("a.JPG") and is_image_file("b.Jpeg") and is_image_file("c.webp")
    assert is_image_file("d.TIFF") and is_image_file("e.pgm")
    assert not is_image_file(".hidden.jpg") and not is_image_file("notes.txt")
    assert not is_image_file("jpg") and not is_image_file("a.jpg.part")
