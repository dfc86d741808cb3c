"""Engines: what runs the network. `--engine`'s choices come from this registry.

A new engine is one file with an `Engine` subclass and one `register_engine(...)` line below
(or a call from the user's own code before `extract`). The built-in engines are named here and
imported (with torch) when first used, so listing the names imports nothing.
"""

from __future__ import annotations

import importlib

from extract.compute.engines.base import Engine, EngineContext
from extract.core.errors import UserError

AUTO = "auto"
DEFAULT_ENGINE = "torch"
_ENGINES: dict[str, Engine | str] = {}   # a built-in engine is "module:Class" until first used


def register_engine(engine: Engine, *, replace: bool = False) -> Engine:
    """Add an engine under `engine.name`; a name registered twice is a ValueError unless `replace`."""
    if not engine.name or (engine.name in _ENGINES and not replace) or engine.name == AUTO:
        raise ValueError(f"engine name {engine.name!r} is empty, reserved or already registered")
    _ENGINES[engine.name] = engine
    return engine


def unregister_engine(name: str) -> None:
    _ENGINES.pop(name, None)


def engine_names() -> list[str]:
    return list(_ENGINES)


def get_engine(name: str) -> Engine:
    try:
        engine = _ENGINES[name]
    except KeyError:
        raise UserError(f"unknown engine {name!r}: use {', '.join([*_ENGINES, AUTO])}") from None
    if isinstance(engine, str):
        module, _, cls = engine.partition(":")
        engine = _ENGINES[name] = getattr(importlib.import_module(module), cls)()
    return engine


def resolve_engine(name: str, device: str = "auto", precision: str = "auto") -> str:
    """The engine that runs a request (the identity records it; never 'auto').

    An engine named explicitly checks that it can serve the device (one line when not, or when it
    is not installed). auto: the first registered engine other than torch that prefers this device
    and precision, else torch.
    """
    import torch

    from extract.compute.engine import resolve_device

    if name != AUTO:
        engine = get_engine(name)
        engine.check(device)
        return engine.name
    try:
        asked = None if device == "auto" else torch.device(device)
    except RuntimeError:
        resolve_device(device)   # its one-line message for an unknown device
        raise
    dev = asked if asked is not None else resolve_device("auto")
    for engine in map(get_engine, list(_ENGINES)):
        if engine.name != DEFAULT_ENGINE and engine.preferred(dev, precision):
            return engine.name
    return DEFAULT_ENGINE


_ENGINES["torch"] = "extract.compute.engines.torch_engine:TorchEngine"
_ENGINES["openvino"] = "extract.compute.engines.openvino_engine:OpenVINOEngine"

__all__ = ["Engine", "EngineContext", "register_engine", "unregister_engine", "engine_names", "get_engine",
           "resolve_engine", "AUTO", "DEFAULT_ENGINE"]
