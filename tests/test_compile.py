"""--compile: torch.compile'd backbone, the same features as eager, its compile time kept; refused where it can't apply."""

import numpy as np
import pytest

from extract import load_features
from extract.api import extract
from extract.core.errors import UserError

REQUEST = dict(model="cifar_resnet20", weights="none", data="synthetic", dataset_options={"n": 24}, splits=["train"],
               precision="fp32", progress=False, batch_size=8)


def test_compiled_backbone_gives_the_eager_features_and_records_its_compile_time(tmp_path):
    eager = load_features(extract(**REQUEST, cache_dir=tmp_path / "eager")["train"].path)
    compiled = load_features(extract(**REQUEST, cache_dir=tmp_path / "compiled", compile=True)["train"].path)
    np.testing.assert_allclose(compiled.X, eager.X, rtol=1e-4, atol=1e-5)
    prov = compiled.meta["provenance"]
    assert prov["compile"] is True and prov["compile_seconds"] > 0
    assert eager.meta["provenance"]["compile"] is False and eager.meta["provenance"]["compile_seconds"] is None


def test_compile_is_refused_with_ray(tmp_path):
    with pytest.raises(UserError, match="--compile applies to the torch engine in this process"):
        extract(**REQUEST, cache_dir=tmp_path, compile=True, ray="local")
