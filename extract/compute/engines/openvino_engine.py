"""`--engine openvino`: the frozen backbone converted to OpenVINO and run on the CPU.

The Backbone's traced tap graph (the torch.fx feature extractor that returns the pooled taps) is
converted once with ``openvino.convert_model`` (dynamic batch axis, fixed crop size) and saved as
OpenVINO IR next to the caches it feeds: ``<cache>/<data label>/<model>/openvino/<key>.xml`` (+
``.bin``), where the key hashes what the converted network depends on (model, weights, spatial
input size, taps; the OpenVINO and torch versions). Later runs read the IR (well under a second)
instead of converting again (several seconds: torch.jit tracing). Weights are stored as float32
(``compress_to_fp16=False``): an fp32 extraction must compute with the network's own weights.

The compiled precision is set explicitly, never left to OpenVINO's CPUID-based default: bf16 only
when the resolved precision is bf16 *and* the CPU has native bf16 (``engine.cpu_has_bf16``), f32
otherwise (a bf16 model on an AVX2-only CPU fails at inference). ``PERFORMANCE_HINT`` is
THROUGHPUT with ``INFERENCE_NUM_THREADS`` = the threads given (extract passes the cores its decode
workers leave, as for torch; default: every core this process may use); each batch is split
across the compiled model's streams (one infer request each), which measured as fast as LATENCY
with one request on 2 quiet cores and faster on busy ones (THROUGHPUT with one request per batch
runs one stream only: half the speed).

OpenVINO's Python package reports usage to Google Analytics on import and on every conversion
unless the user opted out; featprobe is an offline tool, so openvino is imported with its
telemetry package hidden, which makes OpenVINO use its own no-op stub (its documented behaviour
when ``openvino-telemetry`` is not installed).

OpenVINO's CPU plugin gives the thread that compiles a model a fresh alternate signal stack (for
AMX's large signal frames) and, when that compiled model is freed, puts back the stack it found,
as a stack: two compiled models freed in the order they were made leave the thread on the first
one's unmapped signal stack. The next signal that reaches a Python handler then runs on freed
memory and kills the process (SIGSEGV) -- e.g. the DataLoader's SIGCHLD handler when a subprocess
ends, which is how it showed: "a process that ran OpenVINO crashes when a DataLoader worker forks
and a subprocess follows". Every OpenVINO call here that may do so runs under `signal_stack_kept`,
which hands the thread back the signal stack it had (none unless something such as faulthandler set
one: signals then use the thread's own stack, as in any process without OpenVINO).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from extract.compute.engine import INT8, cpu_has_bf16
from extract.compute.engines.base import Engine, EngineContext
from extract.core.errors import UserError
from extract.compute.pipeline import to_model_input
from extract.store.preprocess import Preprocess

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[openvino]"'
INT8_HINT = 'pip install -e ".[int8]"'
PERFORMANCE_HINT = "THROUGHPUT"
IR_FORMAT = 1          # bump when the conversion below changes: old IR files are then ignored
CONVERSIONS = 0        # conversions done by this process (tests check that a cached IR is reused)


def import_openvino():
    """The openvino module; one-line UserError when it is not installed. Its telemetry stays off."""
    if "openvino" in sys.modules and sys.modules["openvino"] is not None:
        return sys.modules["openvino"]
    hidden = "openvino_telemetry" not in sys.modules
    if hidden:
        sys.modules["openvino_telemetry"] = None   # -> ImportError inside openvino -> its no-op stub
    try:
        import openvino
    except ImportError:
        raise UserError(f"--engine openvino needs OpenVINO, which is not installed: {INSTALL_HINT}") from None
    finally:
        if hidden and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]
    return openvino


def available() -> bool:
    """True when OpenVINO can be imported (for --engine auto)."""
    try:
        import_openvino()
    except UserError:
        return False
    return True


class _SignalStack(ctypes.Structure):   # stack_t (sigaltstack(2)), the same on every Linux architecture
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


SS_DISABLE = 2
_LIBC = None


def _sigaltstack():
    """libc's sigaltstack, or None where there is none (not Linux)."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
            _LIBC = libc.sigaltstack if libc is not None else False
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def signal_stack() -> tuple[int, int, int] | None:
    """This thread's alternate signal stack as (address, flags, size); None where it cannot be read."""
    call = _sigaltstack()
    current = _SignalStack()
    if call is None or call(None, ctypes.byref(current)) != 0:
        return None
    return current.ss_sp or 0, current.ss_flags, current.ss_size


@contextmanager
def signal_stack_kept():
    """Run the block, then give this thread back the alternate signal stack it had before (see the module
    docstring: OpenVINO's compiled models otherwise leave it on freed memory); a no-op off Linux."""
    call = _sigaltstack()
    saved = _SignalStack()
    kept = call is not None and call(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if kept:
            saved.ss_flags &= SS_DISABLE            # the only flag one may set back (not SS_ONSTACK)
            call(ctypes.byref(saved), None)


def version() -> str:
    return import_openvino().__version__


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def precision_hint(precision: torch.dtype | None) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a resolved precision: bf16 only where the CPU has it. An int8
    network keeps f32 for the layers NNCF leaves unquantized, so that it means the same on every CPU."""
    return "bf16" if precision == torch.bfloat16 and cpu_has_bf16() else "f32"


@contextmanager
def no_cuda_warning():
    """Hide the warning torch's C++-extension helper logs when NNCF loads it on a machine without CUDA."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_log.setLevel(level)


def import_nncf():
    """The nncf module (imported without `no_cuda_warning`'s warning)."""
    with no_cuda_warning():
        import nncf
    return nncf


def nncf_available() -> bool:
    try:
        import_nncf()
    except ImportError:
        return False
    return True


def check_precision(precision: torch.dtype | None) -> None:
    """One-line UserError for a precision OpenVINO is not asked to compute here: fp16, bf16 on a CPU
    without native bf16 (where torch would emulate it; OpenVINO would fail or silently run f32), or int8
    without NNCF."""
    if precision not in (None, torch.float32, torch.bfloat16, INT8):
        raise UserError("--engine openvino computes fp32, bf16 or int8: use --precision auto, fp32, bf16 or "
                        "int8, or --engine torch")
    if precision == INT8 and not nncf_available():
        raise UserError(f"--precision int8 quantizes the network with NNCF, which is not installed: {INT8_HINT}")
    if precision == torch.bfloat16 and not cpu_has_bf16():
        raise UserError("--precision bf16 with --engine openvino needs a CPU with native bf16 (AVX512-BF16 or "
                        "AMX), which this one lacks: use --precision fp32 or auto, or --engine torch")


def _weights_key(backbone) -> str:
    """The weights file's sha256; for random init (or a checkpoint that left weights at random init)
    a hash of the tensors themselves, since no file names them."""
    missing = (backbone.load_report or {}).get("missing")
    if backbone.weights_sha256 and not missing:
        return backbone.weights_sha256
    h = hashlib.sha256()
    for name, t in sorted(backbone.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return "tensors:" + h.hexdigest()


def model_key(backbone, crop: int) -> dict:
    """What the converted network depends on (hashed into its file name)."""
    return {"format": IR_FORMAT, "model": backbone.name, "weights_sha256": _weights_key(backbone),
            "crop": int(crop), "taps": list(backbone.layers), "openvino": version(),
            "torch": torch.__version__.split("+")[0]}


def converted_model(backbone, crop: int, folder: Path):
    """(openvino.Model with one output per distinct tap node, {layer: output index}, IR path, converted?).

    Reads `<folder>/<key>.xml` when it is there and readable, else converts and saves it."""
    ov = import_openvino()
    module, index = backbone.tuple_module()
    key = model_key(backbone, crop)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    xml = Path(folder) / f"{backbone.name.replace('/', '_')}-{crop}-{digest}.xml"   # timm/<arch>: one folder
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            model = ov.Core().read_model(str(xml))
            if len(model.outputs) == len(set(index.values())):
                return model, index, xml, False
        except RuntimeError as e:
            log.warning(f"warning: {xml} cannot be read ({(str(e).strip().splitlines() or [''])[-1]}); "
                        "converting again")
    log.info(f"converting {backbone.name} to OpenVINO (once; kept in {xml.parent})")
    try:
        model = _convert(ov, module, crop)
    except Exception as e:  # noqa: BLE001 - an op OpenVINO's frontend cannot take: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"OpenVINO could not convert {backbone.name} ({first[:200]}); use --engine torch") from None
    model.set_rt_info(json.dumps(key, sort_keys=True), "featprobe_key")
    _save(ov, model, xml)
    return model, index, xml, True


def _convert(ov, module: torch.nn.Module, crop: int):
    global CONVERSIONS
    module = module.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")   # torch.jit.trace deprecation and tracer warnings
        model = ov.convert_model(module, example_input=torch.zeros(2, 3, crop, crop), input=[-1, 3, crop, crop])
    CONVERSIONS += 1
    return model


def _save(ov, model, xml: Path) -> None:
    """Write the IR whole or not at all: temporary names, .bin renamed before .xml (the file looked for)."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    except OSError as e:
        log.warning(f"warning: could not keep the converted model in {xml.parent} ({e.strerror or e}); "
                    "it will be converted again next time")
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)


def network_input(x: torch.Tensor, preprocess: Preprocess) -> np.ndarray:
    """A uint8 batch as the compiled network takes it: resized when needed and normalised by
    `pipeline.to_model_input`, as a contiguous float32 NCHW array."""
    with torch.inference_mode():
        return np.ascontiguousarray(to_model_input(x, preprocess, torch.device("cpu")).float().numpy())


def quantized_model(model, xml: Path, calibration, preprocess: Preprocess, decoder: str):
    """(the network quantized to int8 by NNCF on `calibration`'s images, its IR path, quantized now?).

    Reads `<converted IR stem>-int8-<key>.xml` when it is there, else quantizes (NNCF's default preset,
    mixed-precision activations left to NNCF, fast bias correction) and keeps the result beside the
    converted network; the key hashes the calibration images' fingerprint, the preprocessing, the decoder
    and NNCF's version."""
    nncf = import_nncf()
    ov = import_openvino()
    key = {"calibration": calibration.fingerprint, "preprocess": preprocess.as_dict(), "decoder": decoder,
           "nncf": nncf.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = xml.with_name(f"{xml.stem}-int8-{digest}.xml")
    if path.is_file() and path.with_suffix(".bin").is_file():
        try:
            return ov.Core().read_model(str(path)), path, False
        except RuntimeError as e:
            log.warning(f"warning: {path} cannot be read ({(str(e).strip().splitlines() or [''])[-1]}); "
                        "quantizing again")
    batches = [network_input(x, preprocess) for x in calibration.batches(preprocess, decoder)]
    samples = [batch[i:i + 1] for batch in batches for i in range(len(batch))]
    if not samples:
        raise UserError(f"--precision int8: none of the {len(calibration.positions)} calibration images of "
                        f"{calibration.source.name} could be read")
    log.info(f"quantizing to int8 with NNCF on {len(samples)} {calibration.source.name} images "
             f"(once; kept in {path.parent})")
    try:
        with signal_stack_kept(), no_cuda_warning():
            quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    except Exception as e:  # noqa: BLE001 - an op NNCF cannot quantize: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"NNCF could not quantize the network ({first[:200]}); use --precision fp32 or bf16") from None
    _save(ov, quantized, path)
    return quantized, path, True


class OpenVINOEmbedder:
    """A frozen backbone compiled by OpenVINO for the CPU: uint8 batch in, {layer: (B, D) float32 tensor} out.

    The same call as `engine.Embedder`: the batch becomes the network's input (`network_input`) and is
    handed to the compiled model.
    """

    device = torch.device("cpu")

    def __init__(self, backbone, precision: torch.dtype | None, preprocess: Preprocess, model_dir,
                 threads: int | None = None, calibration=None, decoder: str = "tensor"):
        check_precision(precision)
        ov = import_openvino()
        self.preprocess, self.layers = preprocess, list(backbone.layers)
        backbone.eval().requires_grad_(False)
        model, self.index, self.model_file, self.converted = converted_model(backbone, preprocess.crop, model_dir)
        self.quantized = None
        if precision == INT8:
            if calibration is None:
                raise UserError("--precision int8 needs the images to calibrate on (the train split)")
            model, self.model_file, self.quantized = quantized_model(model, self.model_file, calibration,
                                                                     preprocess, decoder)
            self.calibration = calibration.fingerprint
        self.hint = precision_hint(precision)
        self.threads = threads or cores()
        config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": PERFORMANCE_HINT,
                  "INFERENCE_NUM_THREADS": self.threads}
        try:
            with signal_stack_kept():
                self.compiled = ov.Core().compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise UserError(f"OpenVINO could not compile {backbone.name} for this CPU at {self.hint} "
                            f"({(str(e).strip().splitlines() or [''])[-1]}); use --engine torch") from None
        compiled = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.compiled_precision = getattr(compiled, "get_type_name", compiled.__str__)()
        n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        with signal_stack_kept():
            self.requests = [self.compiled.create_infer_request() for _ in range(n)]

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = network_input(x, self.preprocess)
        parts = np.array_split(x, max(1, min(len(self.requests), len(x))))
        requests = self.requests[:len(parts)]
        for request, part in zip(requests, parts):   # one part per stream, run side by side
            request.start_async({0: part})
        for request in requests:
            request.wait()
        outputs = [np.concatenate([r.get_output_tensor(i).data for r in requests])
                   for i in range(len(self.compiled.outputs))]   # copies: the requests are reused
        return {layer: torch.from_numpy(outputs[self.index[layer]]) for layer in self.layers}

    def provenance(self) -> dict:
        return {"engine": "openvino", "openvino": {
            "version": version(), "precision_hint": self.hint, "compiled_precision": self.compiled_precision,
            "performance_hint": PERFORMANCE_HINT, "threads": self.threads, "infer_requests": len(self.requests),
            "model_file": str(self.model_file), "converted_now": self.converted,
            **({"int8": {"calibration": self.calibration, "quantized_now": self.quantized}}
               if self.quantized is not None else {})}}


class OpenVINOEngine(Engine):
    """`--engine openvino`: CPU only, fp32, native bf16 or int8 (NNCF); --engine auto picks it on the CPU when
    installed."""

    name = "openvino"

    def check(self, device: str) -> None:
        asked = None if device == "auto" else torch.device(device).type
        if asked not in (None, "cpu"):
            raise UserError(f"--engine openvino runs on the CPU only: drop --device {device}, "
                            "or use --engine torch")
        import_openvino()   # one line when it is not installed

    def device(self, requested: str) -> torch.device:
        return torch.device("cpu")

    def check_precision(self, autocast: torch.dtype | None) -> None:
        check_precision(autocast)

    def preferred(self, device: torch.device, precision: str) -> bool:
        precision_ok = precision in ("auto", "fp32") or (precision == "bf16" and cpu_has_bf16()) or \
            (precision == "int8" and nncf_available())
        return device.type == "cpu" and precision_ok and available()

    def build(self, backbone, context: EngineContext) -> OpenVINOEmbedder:
        return OpenVINOEmbedder(backbone, context.autocast, context.preprocess, context.workdir,
                                threads=context.threads, calibration=context.calibration, decoder=context.decoder)
