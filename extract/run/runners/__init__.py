"""Runners: where a split's missing chunks are computed. `--runner`'s choices come from this registry.

A new runner is one file with a `Runner` subclass and one `register_runner(...)` line below (or a
call from the user's own code before `extract`). Every runner computes the same chunks with the
same batches (`extract.run.job`), so every runner gives the same cache file. The built-in runners
are imported (with torch) when one is made, so listing the names imports nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from extract.core.errors import UserError
from extract.run.request import ExtractRequest

if TYPE_CHECKING:
    from extract.run.runners.base import Runner, Work

AUTO = "auto"
_RUNNERS: dict[str, Callable[[ExtractRequest], Runner]] = {}


def register_runner(name: str, factory: Callable[[ExtractRequest], Runner], *, replace: bool = False) -> None:
    """Add a runner made by `factory(request)`; a name registered twice is a ValueError unless `replace`."""
    if not name or name == AUTO or (name in _RUNNERS and not replace):
        raise ValueError(f"runner name {name!r} is empty, reserved or already registered")
    _RUNNERS[name] = factory


def unregister_runner(name: str) -> None:
    _RUNNERS.pop(name, None)


def runner_names() -> list[str]:
    return list(_RUNNERS)


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def choose_runner(request: ExtractRequest) -> Runner:
    """The runner a request asks for; auto: torchrun when torchrun started this process, Ray when
    an address is given, else this process."""
    name = request.runner
    if launched() and (request.ray or name not in (AUTO, "torchrun")):
        raise UserError(f"--{'ray' if request.ray else 'runner ' + name} and torchrun are two ways to share the "
                        "work: use one of them")
    if name == AUTO:
        name = "torchrun" if launched() else ("ray" if request.ray else "process")
    elif request.ray and name != "ray":
        raise UserError(f"--ray is an address for the ray runner, not for --runner {name}")
    if name not in _RUNNERS:
        raise UserError(f"unknown runner {name!r}: use {', '.join([AUTO, *_RUNNERS])}")
    return _RUNNERS[name](request)


def _process(request: ExtractRequest) -> Runner:
    from extract.run.runners.process import ProcessRunner
    return ProcessRunner()


def _torchrun(request: ExtractRequest) -> Runner:
    from extract.run.runners.torchrun import TorchrunRunner
    return TorchrunRunner(request.device)


def _ray(request: ExtractRequest) -> Runner:
    from extract.run.runners.ray_runner import RayRunner
    return RayRunner(request.ray)


def __getattr__(name):
    if name in ("Runner", "Work"):
        from extract.run.runners import base
        return getattr(base, name)
    raise AttributeError(name)


register_runner("process", _process)
register_runner("torchrun", _torchrun)
register_runner("ray", _ray)

__all__ = ["Runner", "Work", "register_runner", "unregister_runner", "runner_names", "choose_runner", "AUTO"]
