"""Checkpoint files: where they live, how they are fetched, hashed and fitted to a network.

Published checkpoints wrap their weights in containers (``{"state_dict": ...}``,
``{"teacher": ...}``, VISSL's ``classy_state_dict.base_model.model.trunk``) and
prefix the keys (``module.``, ``module.encoder_q.``, ``backbone.``). Instead of a
table per publisher, :func:`fit_state_dict` picks the nested tensor dict and the
key prefix that match the most of the network's own keys, drops projection and
classification heads, and reports everything else it could not place.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from extract.core.errors import UserError
from extract.core.filehash import _SHA_CACHE, sha256_file, sha_cache_file  # noqa: F401 - re-exported
from extract.registry.hubfiles import (_hash_prefix, _offline, _reachable, check_file_hash,  # noqa: F401 - re-exported
                                       hub_checkpoint_dir, hub_file)

# Heads that self-supervised and supervised checkpoints carry next to the trunk.
HEAD_PREFIXES = ("fc.", "linear.", "classifier.", "head.", "heads.", "projection_head.", "prototypes.",
                 "projector.", "predictor.", "projection.", "prediction.", "_fc.", "neck.",
                 "aux1.", "aux2.", "AuxLogits.", "head_dist.")   # auxiliary / distillation classifiers
# Containers, in order of preference when several hold equally good weights.
CONTAINER_KEYS = ("state_dict", "model", "teacher", "target_encoder", "online_network", "classy_state_dict",
                  "base_model", "trunk", "backbone", "encoder", "network", "net", "module", "student")
# Prefixes preferred when several fit equally well (e.g. mmselfsup BYOL holds both backbone. and online_net.0.).
PREFERRED_PREFIXES = ("", "module.", "backbone.", "module.encoder_q.", "encoder_q.", "module.backbone.",
                      "encoder.", "module.encoder.", "_feature_blocks.", "online_network.encoder.")
log = logging.getLogger(__name__)


HF_FILES = ("model.safetensors", "pytorch_model.bin")   # what timm's hub loader looks for, in its order


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _offline()


def hf_cached(repo: str, filenames: Iterable[str] = HF_FILES) -> Path | None:
    """The first of `filenames` of hub repo `repo` (``owner/name[@revision]``) already in the cache; no network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def hf_file(repo: str, filenames: Iterable[str] = HF_FILES, *, download: bool = True) -> Path:
    """A weights file of Hugging Face hub repo `repo` in the hub's own cache, downloaded once if allowed.

    The first of `filenames` the repo has is used (safetensors before a pickled .bin, as timm does).
    Offline (``HF_HUB_OFFLINE=1``, ``FEATPROBE_OFFLINE=1``, ``download=False`` or no network) a
    missing file is one UserError naming the repo, the file and the cache folder it belongs in.
    """
    filenames = tuple(filenames)
    found = hf_cached(repo, filenames)
    if found is not None:
        return found
    repo_id, _, revision = repo.partition("@")
    folder = hf_cache_dir()

    def missing(reason: str) -> UserError:
        return UserError(f"weights {repo_id}/{filenames[0]} not found in the Hugging Face cache {folder}/ "
                         f"(HF_HOME) and {reason}; run once with the network to download them there, copy that "
                         f"cache folder from a machine that has them, or download "
                         f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{filenames[0]} "
                         f"and pass it with --weights FILE")

    if not download or _hf_offline():
        raise missing("downloading is turned off" + (" (HF_HUB_OFFLINE)" if download and not _offline() else ""))
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    reason = _reachable(constants.ENDPOINT)
    if reason:
        raise missing(f"there is no network ({reason})")
    for name in filenames:
        try:
            log.info(f"downloading {repo_id}/{name} into {folder}")
            return Path(hf_hub_download(repo_id, name, revision=revision or None))
        except EntryNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - network, auth, gated repos: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise missing(f"the download failed ({first})") from None
    raise UserError(f"the hub repo {repo_id} has none of {', '.join(filenames)}")


def load_refusal(e: Exception) -> str:
    """The line of a torch.load error that says what it refused (an unsupported global), else its first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line:
            return line.split("error:")[-1].split(". Please")[0].strip()
    return lines[0] if lines else type(e).__name__


def published_types() -> list:
    """Types beyond tensors and plain data that published checkpoints hold: training arguments
    (DINO's argparse.Namespace) and numpy values (scalars, small arrays, their dtypes)."""
    import numpy as np

    dtypes = [np.dtype(t) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return [argparse.Namespace, np.dtype, np.ndarray, *{type(d) for d in dtypes},
            np.float64(0).__reduce__()[0],     # numpy's scalar constructor (its module moved in numpy 2)
            np.zeros(1).__reduce__()[0]]       # numpy's array reconstructor


def read_checkpoint(path: str | os.PathLike):
    """torch.load on CPU, weights-only: tensors, plain data and `published_types`, so no file can run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{path} is a safetensors file: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot read {path} as a safetensors file ({first})") from None
    try:
        with torch.serialization.safe_globals(published_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem becomes one clear line
        raise UserError(f"cannot read {path} as a weights-only PyTorch checkpoint ({load_refusal(e)}); "
                        "re-save its state_dict with torch.save(model.state_dict(), file)") from None


def _tensor_dicts(obj, path: str = "", depth: int = 0) -> Iterable[tuple[str, dict]]:
    """Every nested mapping whose values are mostly tensors, preferred containers first."""
    if not isinstance(obj, Mapping) or depth > 5:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        yield path, tensors
    keys = sorted((k for k in obj if isinstance(k, str)),
                  key=lambda k: CONTAINER_KEYS.index(k) if k in CONTAINER_KEYS else len(CONTAINER_KEYS))
    for k in keys:
        yield from _tensor_dicts(obj[k], f"{path}.{k}" if path else k, depth + 1)


def _best_prefix(keys: Iterable[str], wanted: set[str]) -> tuple[str, int]:
    """The key prefix under which the most `wanted` names appear, and how many do."""
    counts: dict[str, int] = {}
    for k in keys:
        if k in wanted:
            counts[""] = counts.get("", 0) + 1
        for i, c in enumerate(k):
            if c == "." and k[i + 1:] in wanted:
                counts[k[:i + 1]] = counts.get(k[:i + 1], 0) + 1
    if not counts:
        return "", 0
    def rank(p):
        return (-counts[p], PREFERRED_PREFIXES.index(p) if p in PREFERRED_PREFIXES else len(PREFERRED_PREFIXES),
                len(p))
    best = min(counts, key=rank)
    return best, counts[best]


def _is_head(key: str, head_prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in head_prefixes)


def fit_state_dict(obj, net: nn.Module, head_prefixes: Iterable[str] = HEAD_PREFIXES) -> tuple[dict, dict]:
    """Find the network's weights inside a loaded checkpoint.

    Returns ``(state_dict, report)``: the tensors renamed to the network's keys, and
    ``{"container", "prefix", "missing", "unexpected", "dropped", "ignored"}`` where
    `missing` are network keys the checkpoint lacks (BatchNorm ``num_batches_tracked``
    counters excepted), `unexpected` are keys under the prefix that fit nothing,
    `dropped` are classification/projection heads, and `ignored` counts keys outside
    the chosen prefix (a momentum encoder, an optimizer...).
    """
    head_prefixes = tuple(head_prefixes)
    wanted = set(net.state_dict())
    best = None
    for container, tensors in _tensor_dicts(obj):
        prefix, count = _best_prefix(tensors, wanted)
        if best is None or count > best[2]:
            best = (container, prefix, count, tensors)
    if best is None or best[2] == 0:
        raise UserError("checkpoint holds no tensor whose name matches this network "
                        f"(expected keys such as {sorted(wanted)[:3]})")
    container, prefix, _, tensors = best
    state, unexpected, dropped, ignored = {}, [], [], 0
    parent = prefix.rstrip(".").rpartition(".")[0]
    parent = parent + "." if parent else ""
    for k, v in tensors.items():
        if not k.startswith(prefix):   # a sibling head (DINO's head., mmselfsup's neck.) or another encoder
            if k.startswith(parent) and _is_head(k[len(parent):], head_prefixes):
                dropped.append(k[len(parent):])
            else:
                ignored += 1
            continue
        name = k[len(prefix):]
        if name in wanted:
            state[name] = v
        elif _is_head(name, head_prefixes):
            dropped.append(name)
        else:
            unexpected.append(name)
    missing = sorted(k for k in wanted - set(state) if not k.endswith("num_batches_tracked"))
    report = {"container": container, "prefix": prefix, "missing": missing, "unexpected": sorted(unexpected),
              "dropped": sorted(dropped), "ignored": ignored}
    return state, report


def load_into(net: nn.Module, obj, head_prefixes: Iterable[str] = HEAD_PREFIXES, *, source: str = "checkpoint",
              allow_missing: bool = False) -> dict:
    """Load a checkpoint object into `net`; return the load report.

    A shape mismatch is a UserError naming the key. Weights of the network that the checkpoint
    lacks are refused (they would stay at random init) unless `allow_missing`; unused checkpoint
    keys are logged as a warning.
    """
    state, report = fit_state_dict(obj, net, head_prefixes)
    own = net.state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{source} does not fit this network: {k} has shape {tuple(v.shape)}, "
                            f"the network expects {tuple(own[k].shape)}")
    missing = report["missing"]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        total = sum(not k.endswith("num_batches_tracked") for k in own)
        what = f"{source} lacks {len(missing)} of the network's {total} weight tensors ({shown})"
        if not allow_missing:
            raise UserError(f"{what}: is it a checkpoint of another architecture? "
                            "Pass --allow-missing-weights to leave them at random init")
        log.warning(f"warning: {what}; left at random init (--allow-missing-weights)")
    net.load_state_dict(state, strict=False)
    if report["unexpected"]:
        shown = ", ".join(report["unexpected"][:5]) + (" ..." if len(report["unexpected"]) > 5 else "")
        log.warning(f"warning: {source} has {len(report['unexpected'])} weights this network does not use: {shown}")
    return report
