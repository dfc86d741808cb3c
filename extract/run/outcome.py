"""What an extraction did, per split and in one sentence."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SplitResult:
    """Where one split's features are and how they got there."""

    split: str
    path: Path
    status: str  # "hit", "extracted", "resumed" or "updated" (an image folder that changed)
    images: int = 0
    seconds: float = 0.0
    skipped: int = 0
    reuse: str = ""  # for "updated": what was reused, new, removed and changed

    def __fspath__(self) -> str:
        return str(self.path)


def _and(names: list[str]) -> str:
    if not names:
        return ""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


def summary(results: dict[str, SplitResult], started: float) -> str:
    """One sentence: what was extracted, how fast, what was already cached, and where."""
    images = sum(r.images for r in results.values())
    where = ", ".join(sorted({str(r.path.parent) for r in results.values()}))
    hits = [r.split for r in results.values() if r.status == "hit"]
    done = [r.split for r in results.values() if r.status in ("resumed", "extracted") and not r.images]
    updated = [f"{r.split}: {r.reuse}" for r in results.values() if r.status == "updated"]
    took = time.perf_counter() - started
    if not images and not updated:
        if done:   # every chunk was already computed: only the file was assembled
            return f"Assembled {_and(done)} from chunks already computed in {took:.1f} s. Features are in {where}."
        verb = "is" if len(hits) == 1 else "are"
        return f"Nothing to extract: {_and(hits)} {verb} already cached in {where} ({took:.1f} s)."
    seconds = sum(r.seconds for r in results.values())
    text = f"Extracted {images:,} images in {_seconds(took)} s"
    if images and seconds:
        text += f" ({images / seconds:.1f} images/s over {_seconds(seconds)} s of extraction)"
    if updated:
        text += f"; updated {_and(updated)}"
    if hits:
        text += f"; {_and(hits)} {'was' if len(hits) == 1 else 'were'} already cached"
    return text + f". Features are in {where}."


def _seconds(x: float) -> str:
    """Seconds with enough digits that a rate printed beside them can be checked (0.056, 5.1, 61.0)."""
    return f"{x:.3f}" if x < 1 else f"{x:.1f}"
