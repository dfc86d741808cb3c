"""--compile: torch.compile'd backbone, the same features as eager, its compile time kept; refused where it can't apply."""

import numpy as np
import pytest

from extract import load_features
from extract.api import extract
from extract.core.errors import UserError

pytestmark = pytest.mark.slow   # subprocesses, clusters and compilers: minutes on 2 cores

# 21 images at batch 8: batches of 8, 8 and 5, the short last one padded to the compiled batch
REQUEST = dict(model="cifar_resnet20", weights="none", data="synthetic", dataset_options={"n": 21}, splits=["train"],
               precision="fp32", progress=False, batch_size=8)


def test_compiled_backbone_gives_the_eager_features_and_records_its_compile_time(tmp_path):
    import torch._dynamo

    eager = load_features(extract(**REQUEST, cache_dir=tmp_path / "eager")["train"].path)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = load_features(extract(**REQUEST, cache_dir=tmp_path / "compiled", compile=True)["train"].path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1, "the short batch recompiled"
    assert compiled.X.shape == eager.X.shape == (21, 64)
    np.testing.assert_allclose(compiled.X, eager.X, rtol=1e-4, atol=1e-5)
    prov = compiled.meta["provenance"]
    assert prov["compile"] is True and prov["compile_seconds"] > 0 and prov["compiled_batch"] == 8
    assert eager.meta["provenance"]["compile"] is False and eager.meta["provenance"]["compile_seconds"] is None
    assert "compiled_batch" not in eager.meta["provenance"] and "tf32" not in eager.meta["provenance"]


def test_padding_repeats_the_last_row_in_the_asked_layout():
    import torch

    from extract.compute.engine import pad_rows

    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    padded = pad_rows(x, 5, channels_last=True)
    assert padded.shape == (5, 3, 2, 2) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:2], x) and all(torch.equal(padded[k], x[1]) for k in (2, 3, 4))
    assert pad_rows(x, 2) is x


def test_compile_is_refused_with_ray(tmp_path):
    with pytest.raises(UserError, match="--compile applies to the torch engine in this process"):
        extract(**REQUEST, cache_dir=tmp_path, compile=True, ray="local")
