"""The frozen probe a fine-tuning run is measured against: its result under results/, or the commands that make one.

A probe result counts when its features come from the same data, model, weights, preprocessing and
input size (how they were computed, such as precision or decoder, may differ) and it scored the same
test rows. Any layer and head count; the best test top-1 is the one compared.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from extract.store.identity import FeatureIdentity, differences
from probe.output.results import SCHEMA

# identity components that change how features are computed, not which features they are
COMPUTE_ONLY = frozenset({"precision", "precision_requested", "dtype", "engine", "decoder", "format"})


def same_features(stored: FeatureIdentity, wanted: FeatureIdentity) -> bool:
    """True when two identities differ at most in COMPUTE_ONLY components."""
    return not set(differences(stored, wanted)) - COMPUTE_ONLY


def same_test_rows(result: dict, test: dict) -> bool:
    """True when a result scored the rows `test` describes (split, and carve when carved)."""
    theirs = result.get("test") or {"split": result.get("test_split"), "carved": None}
    return theirs.get("split") == test.get("split") and theirs.get("carved") == test.get("carved")


def probe_results(identity: FeatureIdentity, test: dict, results_dir) -> list[tuple[Path, dict]]:
    """(path, result) of every probe result under results_dir for these features and test rows."""
    folder = Path(results_dir) / identity.data.label / identity.model
    found = []
    for path in sorted(folder.glob("**/*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(r, dict) and r.get("schema") == SCHEMA and r.get("kind") == "probe"
                and isinstance((r.get("metrics") or {}).get("top1"), (int, float)) and r.get("identity")):
            continue
        try:
            stored = FeatureIdentity.from_dict(r["identity"])
        except (KeyError, TypeError, ValueError):
            continue
        if same_features(stored, identity) and same_test_rows(r, test):
            found.append((path, r))
    return found


def probe_command(config, *, carved: bool, model: str | None = None) -> str:
    """The extract and probe commands that give the frozen logreg probe of a run's model and data;
    `model`: the features' model name (arch.weights) that probe selects by (default: config.model)."""
    data = ["--data", config.data, *(["--root", str(config.root)] if config.root else [])]
    for key, value in config.dataset_options:
        data += ["--option", f"{key}={value}"]
    weights = "none" if config.from_scratch else config.weights
    extract = ["python", "-m", "extract", "--model", config.model, *data]
    if weights not in (None, "default"):
        extract += ["--weights", str(weights)]
    shared = []
    if config.image_size is not None:
        shared += ["--image-size", str(config.image_size)]
    if config.precision != "auto":
        shared += ["--precision", config.precision]
    probe = ["python", "-m", "probe", "--head", "logreg", "--model", model or config.model,
             "--data", str(config.root) if config.root else config.data, *shared]
    if carved:
        probe += ["--test-fraction", f"{config.test_fraction:g}", "--split-seed", str(config.split_seed)]
    if str(config.results_dir) != "results":
        probe += ["--results-dir", str(config.results_dir)]
    return f"{shlex.join(extract + shared)} && {shlex.join(probe)}"


def compare(top1: float, identity: FeatureIdentity, test: dict, results_dir, command: str) -> dict:
    """The result JSON's `frozen_probe` entry: the best matching probe result and whether it scored
    higher than `top1`, or (none found) the command that makes one."""
    found = probe_results(identity, test, results_dir)
    if not found:
        return {"found": 0, "best": None, "probe_better": None, "command": command,
                "searched": str(Path(results_dir) / identity.data.label / identity.model)}
    path, r = max(found, key=lambda pr: pr[1]["metrics"]["top1"])
    best = {"head": r.get("head"), "layer": r.get("layer"), "top1": float(r["metrics"]["top1"]),
            "precision": r.get("precision"), "path": str(path)}
    return {"found": len(found), "best": best, "probe_better": best["top1"] > top1,
            "margin": round(best["top1"] - top1, 6), "command": None}


def hint(entry: dict | None, top1: float) -> str | None:
    """One or two lines for the end of a run: how the frozen probe compares, or how to make one."""
    if not entry:
        return None
    best = entry.get("best")
    if best is None:
        return (f"no frozen-probe result for this model and data in {entry.get('searched', 'the results folder')}; "
                f"the cheaper baseline to compare with:\n  {entry['command']}")
    probe = f"{best['head']} on {best['layer']} {best['top1']:.2%} ({best['path']})"
    if entry["probe_better"]:
        return (f"the frozen probe scored higher on the same test rows: {probe} vs {top1:.2%} fine-tuned; "
                "for this model and data the frozen probe is the better choice")
    verdict = "ties" if best["top1"] == top1 else f"is {100 * (top1 - best['top1']):.2f} points above"
    return f"fine-tuning {verdict} the frozen probe on the same test rows: {probe}"
