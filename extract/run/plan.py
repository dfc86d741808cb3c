"""A request resolved once: its identity, dataset, weights, device, precision, batch size and engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from extract.compute.calibration import Calibration
from extract.compute.engine import INT8, default_workers, precision_name, resolve_precision
from extract.compute.engines import EngineContext, get_engine, resolve_engine
from extract.compute.pipeline import resolve_decoder
from extract.core.errors import UserError
from extract.registry.datasets import Dataset, load_dataset
from extract.registry.models import ResolvedWeights, build_backbone, resolve_weights
from extract.run.identify import identity_of, in_memory, input_geometry
from extract.run.request import ExtractRequest
from extract.store.identity import DEFAULT_DECODER, FeatureIdentity

COMPILE_HINT = "--compile applies to the torch engine in this process: drop it with --engine openvino or --ray"
DEFAULT_BATCH, CUDA_BATCH = 64, 256   # images per forward pass; a GPU needs more to stay busy


@dataclass(frozen=True)
class Plan:
    """A request resolved once: its identity and what is needed to compute it."""

    request: ExtractRequest
    identity: FeatureIdentity
    dataset: Dataset | None
    weights: ResolvedWeights
    device: torch.device
    autocast: torch.dtype | None
    batch_size: int
    dataset_stats: dict | None = None   # --normalize dataset: mean/std of the train split and where they came from

    def load_backbone(self, taps):
        """The backbone with these taps; random init ('none') is seeded so every run of one identity
        sees the same network."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                return build_backbone(self.weights, list(taps), allow_missing=self.request.allow_missing_weights)
            except UserError as e:    # a checkpoint that does not fit: say which model it was given to
                model = self.request.model
                raise (e if model in str(e) else UserError(f"--model {model}: {e}")) from None

    def embedder(self, backbone, identity: FeatureIdentity, cache_path, threads: int | None = None):
        """What runs the network, built by the identity's engine (a converted network is kept beside
        the cache files it feeds, in `<model>/<engine>/`)."""
        engine = get_engine(identity.engine)
        calibration = Calibration.of(self.dataset.splits) if identity.calibration else None
        context = EngineContext(self.device, self.autocast, identity.preprocess,
                                Path(cache_path).parent / engine.name, threads, self.request.compile,
                                calibration, identity.decoder or DEFAULT_DECODER)
        return engine.build(backbone, context)

    def normalization(self, identity: FeatureIdentity) -> dict:
        """The weights' own mean/std and, for --normalize dataset, the dataset's: side by side for reports."""
        own = self.weights.preprocess
        out = {"used": identity.normalize, "weights": {"mean": list(own.mean), "std": list(own.std)},
               "dataset": None}
        if self.dataset_stats is not None:
            out["dataset"] = {k: self.dataset_stats.get(k) for k in ("mean", "std", "split", "n_images", "skipped",
                                                                     "fingerprint", "spatial", "file")}
        return out


def plan(request: ExtractRequest, *, weights: ResolvedWeights | None = None, dataset: Dataset | None = None,
         progress: bool | None = None) -> Plan:
    """The identity of the features a request asks for (no network is run).

    `weights`: the request's weights already resolved (they are resolved once per process); `dataset`:
    the request's dataset already read.
    image_size N: the network sees N x N inputs (None: the weights' own size; N equal to it is the
    same request). normalize "dataset": mean/std of the train split's resized images instead of
    the weights' own, read from the cache folder when remembered there, else computed in one pass
    (`extract.run.normalize`). The identity records the engine and decoder that run.
    """
    r = request
    resolved = weights or resolve_weights(r.model, r.weights)   # published weights download into torch.hub's cache
    if dataset is None:
        dataset = load_dataset(r.data, root=r.root, download=r.download, **r.options)
    engine_name = resolve_engine(r.engine, r.device, r.precision)
    engine = get_engine(engine_name)
    dev = engine.device(r.device)
    autocast = resolve_precision(r.precision, dev)
    engine.check_precision(autocast)
    if r.compile and not engine.supports_compile:
        raise UserError(f"{COMPILE_HINT} (not --engine {engine_name})")
    batch_size = r.batch_size or (CUDA_BATCH if dev.type == "cuda" else DEFAULT_BATCH)
    arrays = in_memory(dataset)
    file_decoder = resolve_decoder(r.decoder, dev)
    image_size, preprocess = input_geometry(r, resolved, arrays)
    stats = None
    if r.normalize == "dataset":
        from extract.run.normalize import STATS_SPLIT, dataset_stats, with_stats

        if STATS_SPLIT not in dataset.splits:
            raise UserError(f"--normalize dataset needs a {STATS_SPLIT} split; {r.data} has "
                            f"{', '.join(dataset.splits)}")
        source = dataset.splits[STATS_SPLIT]
        stats = dataset_stats(source, preprocess, cache_dir=r.cache_dir, data_label=dataset.ref.label, device=dev,
                              batch_size=batch_size, progress=r.progress if progress is None else progress,
                              workers=0 if source.arrays is not None else
                              (default_workers(dev) if r.workers is None else r.workers))
        preprocess = with_stats(preprocess, stats)
    identity = identity_of(r, resolved, dataset.ref, preprocess, image_size, precision=precision_name(autocast),
                           engine=engine_name, decoder=None if arrays else file_decoder,
                           calibration=Calibration.of(dataset.splits).fingerprint if autocast == INT8 else None)
    return Plan(r, identity, dataset, resolved, dev, autocast, batch_size, stats)
