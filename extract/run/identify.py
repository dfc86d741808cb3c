"""A request's FeatureIdentity from what was resolved: its weights, its dataset and what computes it.

`extract.run.plan` resolves the device, precision, engine and decoder with torch; `extract.run.hits`
knows them without torch on a CPU. Both build the identity here, so both compute the same one.
"""

from __future__ import annotations

from extract.core.errors import UserError
from extract.registry.weights import ResolvedWeights
from extract.run.request import ExtractRequest
from extract.store.identity import PENULTIMATE, DataRef, FeatureIdentity
from extract.store.preprocess import Preprocess, effective_preprocess


def in_memory(dataset) -> bool:
    """Whether the dataset's images are small arrays held in memory (resized on the device, no decoder)."""
    return any(s.arrays is not None for s in dataset.splits.values())


def input_geometry(request: ExtractRequest, resolved: ResolvedWeights, arrays: bool) -> tuple[int | None, Preprocess]:
    """(image_size as recorded, spatial preprocessing): --image-size N makes the network see N x N inputs;
    N equal to the weights' own size is the default request (None), so one cache. A network with a fixed
    input size refuses another (one line)."""
    image_size = request.image_size
    if image_size == effective_preprocess(resolved.preprocess, arrays).crop:
        image_size = None
    native = resolved.preprocess.crop
    if resolved.spec.fixed_input and (image_size or native) != native:
        raise UserError(f"{resolved.name} runs at {native}x{native} only (its position embedding is fixed): "
                        f"drop --image-size {image_size}" + (" (small in-memory images are resized to it)"
                                                             if arrays else ""))
    return image_size, effective_preprocess(resolved.preprocess, arrays, image_size)


def identity_of(request: ExtractRequest, resolved: ResolvedWeights, data: DataRef, preprocess: Preprocess,
                image_size: int | None, *, precision: str, engine: str, decoder: str | None,
                calibration: str | None = None) -> FeatureIdentity:
    """The identity of the features `request` asks for, computed at `precision` ('fp32', 'bf16', 'fp16',
    'int8') by `engine`, image files decoded by `decoder` (None for in-memory arrays); `calibration`: the
    int8 calibration images' fingerprint."""
    return FeatureIdentity(
        data=data, model=resolved.name, weights_sha256=resolved.sha256, preprocess=preprocess,
        precision=precision, precision_requested=request.precision, dtype=request.dtype,
        taps=tuple(dict.fromkeys(request.layers or [PENULTIMATE])), image_size=image_size,
        normalize=request.normalize, engine=engine, decoder=decoder, calibration=calibration)
