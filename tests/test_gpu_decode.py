"""--decoder cuda as far as the CPU allows: refused without CUDA (one line), which files go to the GPU and
which stay on the CPU, and the batch -> image -> CPU fallback with a CPU stand-in for nvJPEG. The GPU
itself: tests/test_cuda.py and bench/gpu.py."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from extract.api import plan
from extract.cli import main
from extract.compute import gpu_decode
from extract.compute.pipeline import DecodedFiles, SourceBatches, resolve_decoder
from extract.core.errors import UserError
from probe.analyses.predict import _decoder
from test_fastcpu import PRE, _folder, _photo, _save, _source

CPU = torch.device("cpu")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@no_cuda
def test_refused_without_cuda_in_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match=r"^--decoder cuda decodes JPEGs on a CUDA GPU, and CUDA is not available "
                                        r"here: use --decoder tensor \(the default\) or pil$"):
        resolve_decoder("cuda")
    root = _folder(tmp_path)
    rc = main(["--model", "cifar_resnet20", "--weights", "none", "--data", "imagefolder", "--root", str(root),
               "--decoder", "cuda", "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --decoder cuda decodes JPEGs on a CUDA GPU") and len(err) == 1
    files = _source(sorted(str(p) for p in root.rglob("*.jpg")))
    with pytest.raises(UserError, match="--decoder cuda"):
        SourceBatches(files, PRE, [[0, 1]], decoder="cuda", device=CPU)


def test_a_cache_decoded_on_the_gpu_is_named_apart_and_predicted_with_the_tensor_decoder(tmp_path):
    ident = plan(model="cifar_resnet20", weights="none", data="imagefolder", root=str(_folder(tmp_path)),
                 device="cpu").identity
    gpu = dataclasses.replace(ident, decoder="cuda")
    assert ident.variant == "" and gpu.variant == "cuda"
    assert gpu.cache_path("c", "train").name == "train.cuda.h5"
    assert _decoder("cuda", "cpu") == "tensor" and _decoder("pil", "cpu") == "pil" and _decoder(None, "cpu") == "auto"


def _files(tmp_path):
    photo = Image.fromarray(_photo())
    exif = Image.Exif()
    exif[0x0112] = 6
    cut = tmp_path / "cut.jpg"
    whole = Path(_save(photo, tmp_path / "whole.jpg", quality=90)).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])   # a frame header nvJPEG accepts, then too little data
    (tmp_path / "text.jpg").write_bytes(b"not an image\n" * 10)
    return {
        "plain": _save(photo, tmp_path / "plain.jpg", quality=90),
        "grey": _save(Image.fromarray(_photo(seed=1)[..., 1]), tmp_path / "grey.jpg", quality=90),
        "rotated": _save(photo, tmp_path / "rotated.jpg", quality=90, exif=exif.tobytes()),
        "cmyk": _save(photo.convert("CMYK"), tmp_path / "cmyk.jpg", quality=90),
        "png": _save(photo, tmp_path / "a.png"),
        "cut": str(cut),
        "text": str(tmp_path / "text.jpg"),
    }


def test_workers_send_the_gpu_only_the_jpegs_it_decodes_like_the_cpu(tmp_path):
    files = _files(tmp_path)
    names = list(files)
    source = _source(list(files.values()))
    gpu, cpu = DecodedFiles(source, PRE, decoder="cuda"), DecodedFiles(source, PRE, decoder="tensor")
    assert gpu.gpu and not cpu.gpu
    for k, name in enumerate(names):
        x, i, reason = gpu[k]
        if name in ("plain", "grey", "cut"):   # JPEG bytes, as they are in the file
            assert gpu_decode.is_encoded(x) and reason == "" and bytes(x.numpy()) == Path(files[name]).read_bytes()
        else:   # EXIF-rotated (orientation is applied on the CPU only), CMYK, PNG, not an image: as `tensor`
            assert (x.shape, reason) == (cpu[k][0].shape, cpu[k][2]) and torch.equal(x, cpu[k][0]), name
    assert gpu[names.index("text")][2] == "not an image file"
    # 'nearest' resizing and training transforms keep to the CPU decoders
    assert not DecodedFiles(source, dataclasses.replace(PRE, interpolation="nearest"), decoder="cuda").gpu
    assert not DecodedFiles(source, PRE, transform=lambda img, item: PRE.resize_crop_pil(img), decoder="cuda").gpu


class _CpuNvjpeg:
    """A stand-in for nvJPEG: torchvision's CPU decoder, batched (all or nothing) like decode_jpeg on CUDA."""

    def __init__(self):
        self.calls = []

    def __call__(self, datas):
        self.calls.append(len(datas))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # torchvision 0.29+: "use TorchCodec"
            return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in datas]


def test_a_batch_nvjpeg_refuses_is_decoded_image_by_image_and_the_rest_on_the_cpu(tmp_path):
    files = _files(tmp_path)
    names = list(files)
    source = _source(list(files.values()))
    gpu, cpu = DecodedFiles(source, PRE, decoder="cuda"), DecodedFiles(source, PRE, decoder="tensor")
    items, positions, reasons = zip(*(gpu[k] for k in range(len(names))))
    decode = _CpuNvjpeg()
    x, reasons = gpu_decode.decode_batch(items, positions, list(reasons), preprocess=PRE, device=CPU,
                                         fallback=gpu.decode_on_cpu, decode=decode)
    assert decode.calls == [3, 1, 1, 1]   # the batch of 3 fails on the cut file: then one by one
    assert x.shape == (len(names), 3, PRE.crop, PRE.crop) and x.dtype == torch.uint8
    for k, name in enumerate(names):
        assert reasons[k] == cpu[k][2], name
        assert torch.equal(x[k], cpu[k][0]), name   # the stand-in decodes as the tensor decoder does
    assert reasons[names.index("cut")] == "truncated image data" and not x[names.index("cut")].any()


def test_a_batch_of_good_jpegs_is_one_call_and_out_of_memory_is_not_a_fallback(tmp_path):
    files = _files(tmp_path)
    source = _source([files["plain"], files["grey"], files["png"]])
    gpu = DecodedFiles(source, PRE, decoder="cuda")
    items, positions, reasons = zip(*(gpu[k] for k in range(3)))
    decode = _CpuNvjpeg()
    x, reasons = gpu_decode.decode_batch(items, positions, list(reasons), preprocess=PRE, device=CPU,
                                         fallback=gpu.decode_on_cpu, decode=decode)
    assert decode.calls == [2] and reasons == ["", "", ""]
    assert torch.equal(x[1][0], x[1][1]) and torch.equal(x[1][1], x[1][2])   # greyscale as RGB

    def out_of_memory(datas):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        gpu_decode.decode_batch(items, positions, list(reasons), preprocess=PRE, device=CPU,
                                fallback=gpu.decode_on_cpu, decode=out_of_memory)
