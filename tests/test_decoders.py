"""JPEG decoders beside torchvision's: `draft` (PIL at a reduced DCT scale) and `torchcodec` (TorchCodec).

Each decodes 8-bit greyscale and colour JPEGs into uint8 tensors and leaves everything else (other
formats, CMYK, corrupt files) to PIL with PIL's reasons; each is a word in the cache identity.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.api import extract, plan
from extract.compute import pipeline
from extract.compute.pipeline import DRAFT_MARGIN, DecodedFiles, resolve_decoder
from extract.core.errors import UserError
from extract.registry.datasets import ImageSource
from extract.registry.images import (ImageError, decode_jpeg_draft, decode_jpeg_file, decode_jpeg_torchcodec,
                                     draft_scale, open_jpeg_draft, open_rgb, torchcodec_available)
from extract.store.cache import read_header
from extract.store.preprocess import Preprocess

PRE = Preprocess(resize=64, crop=56, interpolation="bicubic")
HAS_TORCHCODEC = torchcodec_available()
needs_torchcodec = pytest.mark.skipif(not HAS_TORCHCODEC, reason='torchcodec is not installed (pip install -e ".[torchcodec]")')
CPU_DECODERS = ["tensor", "draft"] + (["torchcodec"] if HAS_TORCHCODEC else [])


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour scene with edges and mild noise, like a downscaled photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a = np.stack([128 + 100 * np.sin(6 * xx + 2 * yy), 128 + 90 * np.cos(5 * yy - 3 * xx), 255 * xx * yy], -1)
    a[(xx - 0.5) ** 2 + (yy - 0.35) ** 2 < 0.02] = (230, 40, 40)   # a disc with a sharp edge
    a += rng.normal(0, 3, a.shape)
    return a.clip(0, 255).astype(np.uint8)


def _jpeg(path: Path, w: int, h: int, seed: int = 0, **kw) -> str:
    Image.fromarray(_photo(w, h, seed)).save(path, "JPEG", quality=kw.pop("quality", 90), **kw)
    return str(path)


def _source(paths) -> ImageSource:
    return ImageSource("train", ["a"], np.zeros(len(paths), np.int64), paths=[str(p) for p in paths])


def _items(paths, decoder: str, preprocess=PRE):
    files = DecodedFiles(_source(paths), preprocess, decoder=decoder)
    return [files[i] for i in range(len(paths))]


# --- draft: the DCT scale and the size it gives ---------------------------------------------------------

@pytest.mark.parametrize("size, min_side, scale", [
    ((4032, 3024, ), 256, 8), ((4032, 3024), 512, 4), ((3024, 4032), 512, 4), ((1200, 900), 256, 2),
    ((1200, 900), 450, 2), ((1200, 900), 451, 1), ((500, 375), 256, 1), ((100, 80), 256, 1), ((2048, 2048), 256, 8),
])
def test_draft_scale_is_the_largest_that_keeps_the_short_side(size, min_side, scale):
    assert draft_scale(size, min_side) == scale
    assert min(size) / scale >= min(min_side, min(size))
    if scale < 8:   # the next scale would go below min_side
        assert min(size) // (2 * scale) < min_side


@pytest.mark.parametrize("w, h, min_side", [(1200, 900, 256), (1200, 900, 100), (1001, 667, 160), (640, 480, 256),
                                            (300, 200, 256)])
def test_draft_decodes_at_the_reduced_size(tmp_path, w, h, min_side):
    path = _jpeg(tmp_path / "a.jpg", w, h)
    x = decode_jpeg_draft(path, min_side=min_side)
    s = draft_scale((w, h), min_side)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, math.ceil(h / s), math.ceil(w / s))
    assert min(x.shape[1:]) >= min(min_side, h, w)
    assert open_jpeg_draft(path, min_side=min_side).size == (math.ceil(w / s), math.ceil(h / s))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_draft_applies_the_exif_orientation(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _jpeg(tmp_path / "a.jpg", 1200, 800, exif=exif.tobytes())
    x = decode_jpeg_draft(path, min_side=200)
    full = open_rgb(path)                                   # EXIF-oriented, full size
    assert tuple(x.shape[1:]) == (full.height // 4, full.width // 4)
    small = np.asarray(full.resize((full.width // 4, full.height // 4), Image.Resampling.BOX)).astype(int)
    assert np.abs(x.permute(1, 2, 0).numpy().astype(int) - small).mean() < 3   # the same way up


def test_at_scale_one_draft_gives_the_tensor_decoders_pixels(tmp_path):
    paths = [_jpeg(tmp_path / "small.jpg", 200, 150), _jpeg(tmp_path / "prog.jpg", 240, 180, progressive=True),
             _jpeg(tmp_path / "grey.jpg", 200, 150)]
    Image.open(paths[2]).convert("L").save(paths[2], quality=90)
    for path in paths:
        assert torch.equal(decode_jpeg_draft(path, min_side=2 * PRE.resize), decode_jpeg_file(path))
    for (xd, _, rd), (xt, _, rt) in zip(_items(paths, "draft"), _items(paths, "tensor")):
        assert rd == rt == "" and torch.equal(xd, xt)


@pytest.mark.parametrize("w, h", [(4032, 3024), (1600, 1200), (900, 1300)])
def test_draft_pixels_stay_close_to_the_full_decode_and_resize(tmp_path, w, h):
    path = _jpeg(tmp_path / "big.jpg", w, h, seed=w)
    (xd, _, rd), = _items([path], "draft")
    (xt, _, rt), = _items([path], "tensor")
    assert rd == rt == "" and xd.shape == xt.shape == (3, PRE.crop, PRE.crop) and xd.dtype == torch.uint8
    diff = (xd.int() - xt.int()).abs().float()
    assert diff.mean() < 1.0, float(diff.mean())            # grey levels; a shifted or wrong-way-up image: tens
    assert draft_scale((w, h), DRAFT_MARGIN * PRE.resize) > 1   # it was decoded reduced


def test_the_margin_keeps_twice_the_resize_target(tmp_path):
    """A margin of 2 leaves the resize at least a 2x shrink, whose antialiasing keeps the full decode's look;
    a margin of 1 would decode an 800 x 533 photo at 1/2 and resize it nearly unfiltered."""
    path = _jpeg(tmp_path / "a.jpg", 800, 533)
    assert DRAFT_MARGIN == 2
    pre = Preprocess(resize=256, crop=224, interpolation="bicubic")
    (xd, _, _), = _items([path], "draft", pre)
    (xt, _, _), = _items([path], "tensor", pre)
    assert torch.equal(xd, xt)                              # 533 < 2 x 256: not reduced at all


def test_nearest_resizing_takes_the_reduced_image_through_pil(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", 1600, 1200)
    nearest = Preprocess(resize=64, crop=56, interpolation="nearest")
    (xd, _, rd), = _items([path], "draft", nearest)
    expected = nearest.resize_crop_pil(open_jpeg_draft(path, min_side=DRAFT_MARGIN * 64))
    assert rd == "" and torch.equal(xd, expected)


def test_a_training_transform_gets_full_size_pil_images(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", 1600, 1200)
    seen = []
    files = DecodedFiles(_source([path]), PRE, transform=lambda img, item: seen.append(img.size) or
                         PRE.resize_crop_pil(img), decoder="draft")
    assert files[0][2] == "" and seen == [(1600, 1200)]


# --- fallbacks: what is not an 8-bit grey or colour JPEG goes to PIL, reasons included -----------------

def _fallbacks(tmp_path) -> list[str]:
    photo = Image.fromarray(_photo(1200, 900))
    cmyk = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(cmyk, quality=90)
    png, gif = tmp_path / "a.png", tmp_path / "a.gif"
    photo.save(png)
    photo.convert("P").save(gif)
    return [str(cmyk), str(png), str(gif)]


@pytest.mark.parametrize("decoder", CPU_DECODERS)
def test_cmyk_png_and_gif_get_pils_pixels(tmp_path, decoder):
    paths = _fallbacks(tmp_path)
    assert decode_jpeg_draft(paths[0], min_side=64) is None and decode_jpeg_torchcodec(paths[1]) is None
    for (x, _, r), (xp, _, rp) in zip(_items(paths, decoder), _items(paths, "pil")):
        assert r == rp == "" and torch.equal(x, xp)


def _good_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(1200, 900)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("decoder", CPU_DECODERS)
@pytest.mark.parametrize("name, content", [
    ("empty.jpg", lambda: b""),
    ("text.jpg", lambda: b"this is not an image\n" * 10),
    ("cut.jpg", lambda: _good_jpeg()[: len(_good_jpeg()) // 2]),
    ("header_only.jpg", lambda: _good_jpeg()[:20]),
    ("garbled.jpg", lambda: _good_jpeg()[:400] + b"\xff\xd9"),
    ("cut.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 20),
])
def test_unreadable_files_keep_pils_reasons(tmp_path, decoder, name, content):
    path = tmp_path / name
    path.write_bytes(content())
    (x, _, reason), = _items([path], decoder)
    with pytest.raises(ImageError) as err:
        open_rgb(path)
    assert reason == err.value.reason and not x.any() and x.shape == (3, PRE.crop, PRE.crop)


@pytest.mark.parametrize("decoder", CPU_DECODERS)
def test_missing_files_and_the_pixel_limit(tmp_path, monkeypatch, decoder):
    (tmp_path / "dir.jpg").mkdir()
    items = _items([tmp_path / "nope.jpg", tmp_path / "dir.jpg"], decoder)
    assert [r for _, _, r in items] == [r for _, _, r in _items([tmp_path / "nope.jpg", tmp_path / "dir.jpg"], "pil")]
    assert all(items[k][2] for k in range(2))
    big = _jpeg(tmp_path / "big.jpg", 400, 300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (_, _, reason), = _items([big], decoder)
    assert "too large" in reason


# --- torchcodec ------------------------------------------------------------------------------------------

@needs_torchcodec
@pytest.mark.parametrize("orientation", range(1, 9))
def test_torchcodec_gives_torchvisions_pixels_exif_orientation_included(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _jpeg(tmp_path / "a.jpg", 90, 60, exif=exif.tobytes())
    x = decode_jpeg_torchcodec(path)
    assert x is not None and torch.equal(x, decode_jpeg_file(path))
    assert tuple(x.shape[1:]) == open_rgb(path).size[::-1]


@needs_torchcodec
def test_torchcodec_matches_the_tensor_decoder_on_real_photos(hymenoptera):
    paths = sorted(p for p in hymenoptera.glob("*/*/*") if p.is_file())[::25]
    pre = Preprocess(256, 224, "bicubic")
    for (xc, _, rc), (xt, _, rt) in zip(_items(paths, "torchcodec", pre), _items(paths, "tensor", pre)):
        assert rc == rt == "" and torch.equal(xc, xt)


def test_a_missing_torchcodec_is_one_line(monkeypatch):
    monkeypatch.setattr(pipeline, "torchcodec_available", lambda: False)
    with pytest.raises(UserError, match=r"needs TorchCodec, which is not installed: pip install") as e:
        resolve_decoder("torchcodec")
    assert "\n" not in str(e.value)


# --- the identity ------------------------------------------------------------------------------------------

def _folder(tmp_path, n=4) -> str:
    root = tmp_path / "photos"
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        _jpeg(d / f"{i}.jpg", 800, 600, seed=i)
    return str(root)


REQUEST = dict(model="cifar_resnet20", weights="none", data="imagefolder", precision="fp32", device="cpu",
               progress=False)


@pytest.mark.parametrize("decoder", CPU_DECODERS)
def test_each_decoder_is_a_word_of_the_identity_and_the_file_name(tmp_path, decoder):
    root = _folder(tmp_path)
    ident = plan(**{k: v for k, v in REQUEST.items() if k != "progress"}, root=root, decoder=decoder).identity
    assert ident.decoder == decoder
    word = "" if decoder == "tensor" else f".{decoder}"
    assert ident.cache_path("c", "train").name == f"train{word}.fp32.h5"


def test_draft_caches_live_apart_and_old_caches_stay_hits(tmp_path):
    root, cache = _folder(tmp_path), tmp_path / "cache"
    tensor = extract(**REQUEST, root=root, cache_dir=cache)["train"]          # the default, as before
    draft = extract(**REQUEST, root=root, cache_dir=cache, decoder="draft")["train"]
    assert draft.status == "extracted" and draft.path.name == "train.draft.fp32.h5"
    assert read_header(draft.path)["identity"].decoder == "draft"
    assert read_header(draft.path)["provenance"]["decoder"] == "draft"
    assert extract(**REQUEST, root=root, cache_dir=cache)["train"].status == "hit"
    assert extract(**REQUEST, root=root, cache_dir=cache, decoder="draft")["train"].status == "hit"
    assert tensor.path != draft.path and read_header(tensor.path)["identity"].decoder == "tensor"
    # 800 x 600 photos for a 32-pixel resize: decoded at 1/8, features close to the full decode's
    from extract import load_features

    a, b = load_features(tensor.path).X, load_features(draft.path).X
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert not np.array_equal(a, b) and cos.min() > 0.99


def test_the_cli_takes_draft_and_names_it(tmp_path, capsys):
    from extract.cli import main

    root = _folder(tmp_path)
    args = ["--model", "cifar_resnet20", "--weights", "none", "--data", "imagefolder", "--root", root,
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    assert main(args + ["--decoder", "draft"]) == 0
    assert [p.name for p in (tmp_path / "cache").rglob("*.h5")] == ["train.draft.h5"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args + ["--decoder", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_predict_takes_whichever_of_torchvision_and_torchcodec_is_installed(monkeypatch):
    from probe.analyses.predict import _decoder

    images = "extract.registry.images"
    monkeypatch.setattr(f"{images}.torchcodec_available", lambda: False)
    monkeypatch.setattr(f"{images}.tensor_decoder_available", lambda: True)
    assert _decoder("torchcodec", "cpu") == "tensor" and _decoder("draft", "cpu") == "draft"
    monkeypatch.setattr(f"{images}.torchcodec_available", lambda: True)
    monkeypatch.setattr(f"{images}.tensor_decoder_available", lambda: False)
    assert _decoder("tensor", "cpu") == "torchcodec" and _decoder("cuda", "cpu") == "torchcodec"
    assert _decoder("torchcodec", "cpu") == "torchcodec" and _decoder(None, "cpu") == "auto"
