"""extract.compute.pipeline: decoding with error reasons, uint8 batches from files or arrays, model input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler

from extract.registry.datasets import ImageSource
from extract.compute.pipeline import DecodedFiles, SourceBatches, array_batch, to_model_input
from extract.store.preprocess import Preprocess

PRE = Preprocess(resize=8, crop=8)


def _sources(tmp_path, n=7, size=8):
    """The same random crop-sized images as PNG files and as an in-memory array."""
    pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    paths = []
    for i, a in enumerate(pixels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    labels = np.arange(n) % 2
    return (ImageSource("train", ["a", "b"], labels, paths=paths),
            ImageSource("train", ["a", "b"], labels, arrays=pixels))


def test_an_unreadable_file_is_a_zero_image_with_its_reason(tmp_path):
    files, arrays = _sources(tmp_path, n=3)
    (tmp_path / "1.png").write_bytes(b"not a png")
    (tmp_path / "2.png").write_bytes(b"")
    data = DecodedFiles(files, PRE)
    x, i, reason = data[0]
    assert i == 0 and reason == "" and torch.equal(x, torch.from_numpy(arrays.arrays[0]).permute(2, 0, 1))
    for k in (1, 2):
        x, i, reason = data[k]
        assert i == k and reason and x.dtype == torch.uint8 and x.shape == (3, 8, 8) and not x.any()
    assert data[2][2] == "empty file"


@pytest.mark.parametrize("workers", [0, 1])
def test_files_and_arrays_give_the_same_batches(tmp_path, workers):
    files, arrays = _sources(tmp_path)
    sampler = BatchSampler(range(2, 7), 3, drop_last=False)
    from_files = list(SourceBatches(files, PRE, sampler, workers=workers))
    from_arrays = list(SourceBatches(arrays, PRE, sampler))
    assert [p.tolist() for _, p, _ in from_files] == [[2, 3, 4], [5, 6]]
    for (xf, pf, rf), (xa, pa, ra) in zip(from_files, from_arrays, strict=True):
        assert xf.dtype == xa.dtype == torch.uint8 and torch.equal(xf, xa)
        assert np.array_equal(pf, pa) and rf == ra == [""] * len(pf)


def test_tuple_items_carry_extra_keys_to_the_transform(tmp_path):
    files, arrays = _sources(tmp_path, n=4)
    seen = []

    def transform(img, item):
        seen.append(item)
        return torch.full((3, 8, 8), item[1], dtype=torch.uint8)

    batches = [[(3, 9), (1, 9)]]
    (x, positions, _), = SourceBatches(files, PRE, batches, transform=transform)
    assert positions.tolist() == [3, 1] and seen == [(3, 9), (1, 9)] and bool((x == 9).all())
    (x, positions, _), = SourceBatches(arrays, PRE, batches)
    assert positions.tolist() == [3, 1] and torch.equal(x, array_batch(arrays.arrays, [3, 1]))


def test_array_batch_is_channels_first():
    a = np.random.default_rng(1).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    x = array_batch(a, slice(1, 3))
    assert x.shape == (2, 3, 4, 6) and x[1, 2, 3, 5] == a[2, 3, 5, 2]


def test_decoding_files_leaves_the_global_torch_rng_alone(tmp_path):
    files, _ = _sources(tmp_path, n=3)
    before = torch.get_rng_state()
    list(SourceBatches(files, PRE, BatchSampler(range(3), 2, drop_last=False)))
    assert torch.equal(before, torch.get_rng_state())


def test_model_input_is_normalised_resized_and_in_the_asked_layout():
    pre = Preprocess(resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = to_model_input(x, pre, torch.device("cpu"))
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    grey = torch.full((2, 3, 20, 30), 200, dtype=torch.uint8)
    out = to_model_input(grey, pre, torch.device("cpu"), channels_last=True)
    assert out.shape == (2, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.full_like(out, (200 / 255 - 0.5) / 0.25))
