"""The CPU fast path: glibc malloc tuning, JPEGs decoded by torchvision, decode workers vs threads."""

from __future__ import annotations

import ctypes
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from extract.compute import allocator
from extract.api import extract, plan
from extract.store.cache import digest_path, read_header
from extract.registry.datasets import ImageSource
from extract.compute.engine import Collect, compute_threads, cpu_split, default_workers, run
from extract.core.errors import UserError
from extract.store.identity import DataRef, FeatureIdentity
from extract.registry.images import decode_jpeg_file, jpeg_frame, open_rgb
from extract.compute.pipeline import DecodedFiles, resolve_decoder
from extract.store.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
PRE = Preprocess(resize=36, crop=32, interpolation="bilinear")
TOLERANCE = 2   # grey levels between torchvision's and PIL's decode + antialiased resize


# --- allocator ---------------------------------------------------------------------------------------

def _child(code: str, **env) -> str:
    """Run `code` in a fresh interpreter (the tuning belongs to a process); its last output line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


_MMAPPED_BLOCKS = """
import ctypes
from extract.compute.allocator import tune_malloc, malloc_tuned
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = malloc_tuned()
first, second = tune_malloc(), tune_malloc()
held = libc.mallinfo2().hblks
p = libc.malloc(64 << 20)
mmapped = libc.mallinfo2().hblks - held
libc.free(p)
print(before, first, second, malloc_tuned(), mmapped)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuning_applies_once_per_process_and_stops_mmap_for_large_blocks():
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    # a 64 MiB block: mmapped by default, from the heap once tuned
    assert _child(_MMAPPED_BLOCKS, FEATPROBE_MALLOC_TUNING="1") == "False True True True 0"
    assert _child(_MMAPPED_BLOCKS, FEATPROBE_MALLOC_TUNING="0") == "False False False False 1"


def test_tuning_calls_mallopt_once_with_c_ints(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setenv(allocator.ENV, "1")
    assert allocator.tune_malloc() and allocator.tune_malloc() and allocator.malloc_tuned()
    assert calls == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert all(-2**31 <= v < 2**31 for _, v in calls)


@pytest.mark.parametrize("value", ["0", "false", "off", "No"])
def test_the_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt called although turned off"))
    monkeypatch.setenv(allocator.ENV, value)
    assert not allocator.tune_malloc() and not allocator.malloc_tuned()


def test_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert allocator._mallopt() is None
    assert not allocator.tune_malloc() and not allocator.malloc_tuned()


# --- generated images ---------------------------------------------------------------------------------

def _photo(w=90, h=60, seed=0) -> np.ndarray:
    """A smooth colour image with some texture (what JPEG is for), left and right halves distinct."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    a[:, : w // 2, 0] = 230
    a += rng.normal(0, 12, a.shape)
    return a.clip(0, 255).astype(np.uint8)


def _save(im: Image.Image, path: Path, **kw) -> str:
    im.save(path, **kw)
    return str(path)


def _source(paths) -> ImageSource:
    return ImageSource("train", ["a"], np.zeros(len(paths), np.int64), paths=[str(p) for p in paths])


def _both(paths, preprocess=PRE):
    """[(tensor-decoder item, pil-decoder item)] for every path."""
    src = _source(paths)
    tensor, pil = DecodedFiles(src, preprocess, decoder="tensor"), DecodedFiles(src, preprocess, decoder="pil")
    return [(tensor[i], pil[i]) for i in range(len(paths))]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_generated_jpegs_match_pil_and_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(_photo()), tmp_path / "a.jpg", quality=90, exif=exif.tobytes())
    raw = decode_jpeg_file(path)
    assert raw is not None   # the tensor path, not the fallback
    assert tuple(raw.shape[1:]) == open_rgb(path).size[::-1]   # rotated like PIL: (H, W) swap for 5-8
    for size in (PRE, Preprocess(resize=64, crop=48, interpolation="bicubic")):
        ((xt, it, rt), (xp, ip, rp)), = _both([path], size)
        assert rt == rp == "" and xt.shape == xp.shape == (3, size.crop, size.crop) and xt.dtype == torch.uint8
        assert _max_diff(xt, xp) <= TOLERANCE


def test_greyscale_and_progressive_jpegs_take_the_tensor_path(tmp_path):
    grey = _save(Image.fromarray(_photo()[..., 1]), tmp_path / "grey.jpg", quality=90)
    prog = _save(Image.fromarray(_photo(seed=1)), tmp_path / "prog.jpg", quality=90, progressive=True)
    assert jpeg_frame(Path(grey).read_bytes())[2:] == (1, 8)
    for path in (grey, prog):
        assert decode_jpeg_file(path) is not None
    for (xt, _, rt), (xp, _, rp) in _both([grey, prog]):
        assert rt == rp == "" and _max_diff(xt, xp) <= TOLERANCE
    (xt, _, _), _ = _both([grey])[0]
    assert torch.equal(xt[0], xt[1]) and torch.equal(xt[1], xt[2])


def test_cmyk_png_and_gif_fall_back_to_pil_and_give_its_pixels(tmp_path):
    photo = Image.fromarray(_photo())
    cmyk = _save(photo.convert("CMYK"), tmp_path / "cmyk.jpg", quality=90)
    png = _save(photo, tmp_path / "a.png")
    gif = _save(photo.convert("P"), tmp_path / "a.gif")
    jpeg_named_png = _save(photo, tmp_path / "really_a_jpeg.png", format="JPEG", quality=90)
    assert jpeg_frame(Path(cmyk).read_bytes())[2] == 4
    for path in (cmyk, png, gif):
        assert decode_jpeg_file(path) is None
    assert decode_jpeg_file(jpeg_named_png) is not None   # by content, not by name
    pairs = _both([cmyk, png, gif, jpeg_named_png])
    for (xt, _, rt), (xp, _, rp) in pairs[:3]:
        assert rt == rp == "" and torch.equal(xt, xp)
    assert _max_diff(pairs[3][0][0], pairs[3][1][0]) <= TOLERANCE


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", lambda: b"", "empty file"),
    ("text.jpg", lambda: b"this is not an image\n" * 10, "not an image file"),
    ("cut.jpg", lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated image data"),
    ("header_only.jpg", lambda: _jpeg_bytes()[:20], None),
    ("garbled.jpg", lambda: _jpeg_bytes()[:200] + b"\xff\xd9", None),
    ("cut.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 20, None),
])
def test_unreadable_files_keep_pils_reasons(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content())
    ((xt, it, rt), (xp, ip, rp)), = _both([path])
    assert rt and rt == rp and (reason is None or rt == reason)
    assert not xt.any() and xt.shape == (3, PRE.crop, PRE.crop)


def test_missing_files_and_folders_keep_their_reasons(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    for (xt, _, rt), (xp, _, rp) in _both([tmp_path / "nope.jpg", tmp_path / "dir.jpg"]):
        assert rt and rt == rp


def test_the_decompression_bomb_limit_holds_for_the_tensor_path(tmp_path, monkeypatch):
    path = _save(Image.fromarray(_photo()), tmp_path / "big.jpg", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_jpeg_file(path) is None
    ((_, _, rt), (_, _, rp)), = _both([path])
    assert rt == rp and "too large" in rt


def test_decoder_names(monkeypatch):
    assert resolve_decoder("auto") == resolve_decoder("tensor") == "tensor"
    assert resolve_decoder("pil") == "pil"
    with pytest.raises(UserError, match="unknown decoder"):
        resolve_decoder("cv2")
    monkeypatch.setattr("extract.compute.pipeline.tensor_decoder_available", lambda: False)
    monkeypatch.setattr("extract.compute.pipeline.torchcodec_available", lambda: True)
    assert resolve_decoder("auto") == "torchcodec"     # torchvision without decode_jpeg: TorchCodec's
    monkeypatch.setattr("extract.compute.pipeline.torchcodec_available", lambda: False)
    assert resolve_decoder("auto") == "pil"
    with pytest.raises(UserError, match="use --decoder torchcodec, draft or pil"):
        resolve_decoder("tensor")
    assert resolve_decoder("draft") == "draft"         # PIL's: always there


def test_a_training_transform_still_gets_pil_images(tmp_path):
    path = _save(Image.fromarray(_photo()), tmp_path / "a.jpg", quality=90)
    seen = []
    files = DecodedFiles(_source([path]), PRE, transform=lambda img, item: seen.append(img) or
                         PRE.resize_crop_pil(img), decoder="tensor")
    assert files[0][2] == "" and isinstance(seen[0], Image.Image)


# --- the ants/bees photos -------------------------------------------------------------------------------

def test_real_jpegs_match_pil_within_two_levels(hymenoptera):
    paths = sorted(p for p in hymenoptera.glob("*/*/*") if p.is_file())[::8]
    lite0 = Preprocess(256, 224, "bicubic")   # efficientnet_lite0's resize, crop and interpolation
    diffs = []
    for pre in (lite0, Preprocess(256, 224, "bilinear")):
        for (xt, _, rt), (xp, _, rp) in _both(paths, pre):
            assert rt == rp == ""
            d = (xt.int() - xp.int()).abs()
            assert int(d.max()) <= TOLERANCE
            diffs.append(float(d.float().mean()))
    assert np.mean(diffs) < 0.05   # measured: 0.004 (bicubic), 0.002 (bilinear)
    assert sum(decode_jpeg_file(p) is not None for p in paths) >= len(paths) - 1


# --- the decoder in the identity ----------------------------------------------------------------------

def _folder(tmp_path, n=6, bad: bytes | None = None) -> Path:
    root = tmp_path / "photos"
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(48, 40, seed=i)).save(d / f"{i}.jpg", quality=90)
    if bad is not None:
        (root / "train" / "c0" / "bad.jpg").write_bytes(bad)
    return root


REQUEST = dict(model="cifar_resnet20", weights="none", data="imagefolder", precision="fp32", device="cpu",
               progress=False)


def test_the_decoder_is_part_of_the_identity_and_the_path(tmp_path):
    root = str(_folder(tmp_path))
    tensor = plan(**{k: v for k, v in REQUEST.items() if k != "progress"}, root=root).identity
    pil = plan(**{k: v for k, v in REQUEST.items() if k != "progress"}, root=root, decoder="pil").identity
    assert tensor.decoder == "tensor" and pil.decoder == "pil"
    assert tensor.variant == "fp32" and pil.variant == "pil.fp32"   # fp32 was asked for explicitly
    assert pil.cache_path("c", "train").name == "train.pil.fp32.h5"
    assert dataclasses.replace(pil, precision_requested="auto").variant == "pil"
    assert dataclasses.replace(tensor, precision_requested="auto").variant == ""
    for decoder in ("tensor", "pil"):   # in-memory arrays are not decoded: no decoder, one path
        mem = plan(model="cifar_resnet20", weights="none", data="synthetic", device="cpu", precision="fp32",
                   decoder=decoder).identity
        assert mem.decoder is None and mem.variant == "fp32"
    with pytest.raises(UserError, match="unknown decoder"):
        plan(model="cifar_resnet20", weights="none", data="synthetic", decoder="opencv")


def test_files_without_the_field_were_decoded_by_pil():
    ident = FeatureIdentity(data=DataRef("imagefolder", "/x/pets"), model="m", weights_sha256=None,
                            preprocess=Preprocess(), precision="fp32")
    old = ident.to_dict()
    del old["decoder"]
    assert FeatureIdentity.from_dict(old).decoder == "pil"
    assert FeatureIdentity.from_dict(ident.to_dict()) == ident
    mem = ident.to_dict()
    mem["data"] = {"name": "digits", "root": None, "options": {}}
    mem["decoder"] = None
    assert FeatureIdentity.from_dict(mem).decoder is None
    del mem["decoder"]
    assert FeatureIdentity.from_dict(mem).decoder is None


def _drop_decoder_field(path: Path) -> None:
    """Make a cache file look like one written before the decoder was recorded."""
    with h5py.File(path, "r+") as f:
        ident = json.loads(f.attrs["identity"])
        del ident["decoder"]
        f.attrs["identity"] = json.dumps(ident, sort_keys=True)
    digest_path(path).unlink()   # such files had no recorded sha256 either


def test_a_pil_cache_is_not_a_hit_for_the_tensor_decoder(tmp_path):
    root, cache = str(_folder(tmp_path)), tmp_path / "cache"
    pil = extract(**REQUEST, root=root, cache_dir=cache, decoder="pil")["train"]
    assert pil.status == "extracted" and pil.path.name == "train.pil.fp32.h5"
    tensor = extract(**REQUEST, root=root, cache_dir=cache)["train"]
    assert tensor.status == "extracted" and tensor.path.name == "train.fp32.h5"
    assert extract(**REQUEST, root=root, cache_dir=cache, decoder="pil")["train"].status == "hit"
    assert extract(**REQUEST, root=root, cache_dir=cache, decoder="tensor")["train"].status == "hit"
    # a file from before the decoder was recorded was decoded by PIL: a named conflict at the default path
    _drop_decoder_field(tensor.path)
    assert read_header(tensor.path)["identity"].decoder == "pil"
    with pytest.raises(UserError, match=r"the image decoder differs \(pil vs tensor\)"):
        extract(**REQUEST, root=root, cache_dir=cache)


def test_old_in_memory_caches_stay_hits(tmp_path):
    request = dict(model="cifar_resnet20", weights="none", data="synthetic", dataset_options={"n": 8},
                   precision="fp32", device="cpu", progress=False, cache_dir=tmp_path)
    first = extract(**request)
    for r in first.values():
        _drop_decoder_field(r.path)
    assert {r.status for r in extract(**request).values()} == {"hit"}


def test_provenance_records_decoder_allocator_workers_and_threads(tmp_path):
    root = str(_folder(tmp_path, bad=b"\xff\xd8\xff\xe0 truncated"))
    res = extract(**REQUEST, root=root, cache_dir=tmp_path / "cache", workers=0)["train"]
    header = read_header(res.path)
    prov = header["provenance"]
    assert prov["decoder"] == "tensor" and header["identity"].decoder == "tensor"
    assert prov["malloc_tuning"] is allocator.malloc_tuned()
    if GLIBC and allocator.wanted():
        assert prov["malloc_tuning"] is True
    assert prov["workers"] == 0 and prov["torch_threads"] == compute_threads(0)
    assert res.skipped == 1 and header["n_rows"] == 6
    with h5py.File(res.path, "r") as f:
        reasons = [r.decode() if isinstance(r, bytes) else r for r in f["skipped/reason"][:]]
    assert reasons == [open_rgb_reason(Path(root) / "train" / "c0" / "bad.jpg")]


def open_rgb_reason(path) -> str:
    from extract.registry.images import ImageError

    with pytest.raises(ImageError) as err:
        open_rgb(path)
    return err.value.reason


def test_stop_names_the_file_as_before(tmp_path):
    root = str(_folder(tmp_path, bad=b""))
    with pytest.raises(UserError, match=r"cannot read .*bad\.jpg: empty file"):
        extract(**REQUEST, root=root, cache_dir=tmp_path / "cache", on_error="stop", workers=0)


# --- decode workers vs intra-op threads ---------------------------------------------------------------

@pytest.mark.parametrize("cores, split", [(1, (0, 1)), (2, (0, 2)), (3, (0, 3)), (4, (1, 3)), (8, (2, 6)),
                                          (16, (4, 12)), (64, (16, 48))])
def test_cpu_split(cores, split):
    workers, threads = cpu_split(cores)
    assert (workers, threads) == split and workers + threads == cores and threads >= 1
    assert default_workers(torch.device("cpu"), cores) == workers
    assert compute_threads(workers, cores) == threads


def test_explicit_workers_take_at_most_the_default_share_of_cores_and_gpus_keep_their_workers():
    assert compute_threads(1, cores=2) == compute_threads(5, cores=2) == 2
    assert compute_threads(1, cores=16) == 15 and compute_threads(8, cores=16) == 12
    assert compute_threads(0, cores=1) == 1
    assert default_workers(torch.device("cuda"), 16) == 8 and default_workers(torch.device("cuda"), 2) == 2


class _ThreadSpy:
    """An embedder that records torch's intra-op threads while the run calls it."""

    def __init__(self, device="cpu"):
        self.device, self.preprocess, self.seen = torch.device(device), PRE, []

    def __call__(self, x):
        self.seen.append(torch.get_num_threads())
        return {"penultimate": torch.zeros(len(x), 2)}


def test_a_cpu_run_sets_threads_and_restores_them():
    src = ImageSource("train", ["a"], np.zeros(5, np.int64), arrays=np.zeros((5, 32, 32, 3), np.uint8))
    before = torch.get_num_threads()
    spy = _ThreadSpy()
    run(spy, src, Collect(), [[0, 1], [2, 3], [4]], workers=0, progress=False, threads=1)
    assert spy.seen == [1, 1, 1] and torch.get_num_threads() == before
    spy = _ThreadSpy()
    run(spy, src, Collect(), [[0, 1, 2, 3, 4]], workers=0, progress=False)
    assert spy.seen == [compute_threads(0)] and torch.get_num_threads() == before


def test_jpegs_never_reach_pil_under_the_tensor_decoder(tmp_path, monkeypatch):
    jpeg = _save(Image.fromarray(_photo()), tmp_path / "a.jpg", quality=90)
    png = _save(Image.fromarray(_photo()), tmp_path / "b.png")
    opened = []
    src = _source([jpeg, png])
    monkeypatch.setattr(src, "load", lambda i: opened.append(i) or open_rgb(src.paths[i]))
    files = DecodedFiles(src, PRE, decoder="tensor")
    assert files[0][2] == files[1][2] == "" and opened == [1]
    DecodedFiles(src, PRE, decoder="pil")[0]
    assert opened == [1, 0]


def test_nearest_resizing_stays_with_pil(tmp_path):
    path = _save(Image.fromarray(_photo()), tmp_path / "a.jpg", quality=90)
    nearest = Preprocess(resize=40, crop=32, interpolation="nearest")
    ((xt, _, rt), (xp, _, rp)), = _both([path], nearest)
    assert rt == rp == "" and torch.equal(xt, xp)
