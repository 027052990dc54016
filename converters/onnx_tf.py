"""ONNX -> full-integer int8 TFLite with onnx2tf (the converter ultralytics'
TFLite export uses), the route for ONNX graphs that onnx2torch cannot take:
LSTM, GRU, SpaceToDepth, Clip with computed bounds, Resize variants.

onnx2tf, TensorFlow and their pinned dependencies live in their own build venv,
``build/tf-venv`` (``make install-tf``; onnx2tf 2.x needs Python >= 3.12), so
this module only prepares the calibration data and runs
``converters/onnx_tf_worker.py`` (with ``onnx_tf_patches.py``,
``onnx_tf_wrap.py`` and ``onnx_tf_tflite.py``) in that venv's Python, with a
time limit.
What the worker does: fix the inputs to static shapes, onnx2tf writes a float
SavedModel (cached per source sha256 under ``build/cache/onnx2tf``), inputs
and outputs are put back into the ONNX layouts (NCHW stays NCHW) and checked
against onnxruntime, then TensorFlow's converter quantizes it to int8 kernels
with int8 inputs and outputs (float I/O only when int8 I/O fails), and the
TFLite inputs and outputs get the ONNX names in the ONNX order. On request
(``precisions``) the same run also writes fp16 and fp32 TFLite twins of the
wrapped model: the accuracy fallback and the same-runtime fp32 baseline.

Calibration data: ``{input name: array}``; an array of the input's rank holds
samples along dim 0 (sample i is ``a[i:i+1]``), one of rank + 1 along a new
leading axis (sample i is ``a[i]``). A single-input model may use the key
``x``. At most ``max_samples`` samples (default 32), evenly spread, are used;
fewer for large inputs (16 for a 3x640x640 image, see CALIBRATION_ELEMENTS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import ConversionError, ConverterUnavailable, UnsupportedOp, require

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("onnx_tf_worker.py")
DEFAULT_CACHE = REPO / "build" / "cache" / "onnx2tf"
MAX_SAMPLES = 32
# TensorFlow's int8 calibration runs reference kernels: cap the samples of large inputs so that
# calibration costs about as much as 16 samples of a 3x640x640 image (never fewer than 8 samples).
CALIBRATION_ELEMENTS = 16 * 3 * 640 * 640
MIN_SAMPLES = 8
INSTEAD = ("Instead: serve the float model as it is with `edged bundle create` (the .onnx, or an fp32 .tflite), "
           "or convert for a profile with the ONNX runtime (e.g. --profile generic-arm64)")


def venv_dir() -> Path:
    """The build venv: $EDGED_TF_VENV, else build/tf-venv in the repository."""
    return Path(os.environ.get("EDGED_TF_VENV") or REPO / "build" / "tf-venv")


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def available() -> bool:
    """True when the build venv with onnx2tf exists here."""
    venv = venv_dir()
    return venv_python().is_file() and any(venv.glob("lib/python3*/site-packages/onnx2tf/__init__.py"))


def require_venv() -> Path:
    if not available():
        raise ConverterUnavailable(
            f"the onnx2tf route needs its build venv {venv_dir()} (onnx2tf, TensorFlow; Python >= 3.12): "
            "run `make install-tf`")
    return venv_python()


@dataclass
class OnnxTFResult:
    """The converted model and what the worker reported about it."""

    tflite: Path
    backend: str  # onnx2tf backend that wrote the float model
    io: str  # "int8" or "float" inputs/outputs
    cached_float: bool
    calibration_samples: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    float_tflite: dict[str, Path] = field(default_factory=dict)  # "fp16"/"fp32" twins, when asked for


@dataclass
class _Input:
    name: str
    dtype: np.dtype
    dims: list[int]  # -1 for a dynamic dim


def _onnx_inputs(onnx_path: Path) -> tuple[list[_Input], list[str]]:
    onnx = require("onnx", "convert-onnx", "reading ONNX models")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise ConversionError(f"{onnx_path.name}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        inputs.append(_Input(inp.name, dtype, dims))
    return inputs, [o.name for o in model.graph.output]


def calibration_samples(inputs: list[_Input], calibration: dict[str, np.ndarray],
                        max_samples: int = MAX_SAMPLES) -> dict[str, np.ndarray]:
    """Per input, an array [N, *static shape] of at most ``max_samples`` samples."""
    stacked: dict[str, np.ndarray] = {}
    for inp in inputs:
        key = inp.name if inp.name in calibration else ("x" if len(inputs) == 1 and "x" in calibration else None)
        if key is None:
            raise ConversionError(f"calibration data has no array for input {inp.name!r} (keys: {sorted(calibration)})")
        a = np.asarray(calibration[key])
        rank = len(inp.dims)
        if a.ndim == rank and rank > 0:
            a = a[:, None]  # samples along the batch dim: sample i is a[i:i+1]
        elif a.ndim != rank + 1:
            raise ConversionError(
                f"calibration array for input {inp.name!r} has shape {list(a.shape)}; the input has rank {rank}, "
                f"so it needs rank {rank} (samples along dim 0) or {rank + 1} (samples along a new axis)")
        shape = list(a.shape[1:])
        for i, (want, got) in enumerate(zip(inp.dims, shape)):
            if want > 0 and want != got:
                raise ConversionError(f"input {inp.name!r}: dim {i} is {want} in the model, {got} in the calibration data")
        stacked[inp.name] = a.astype(np.float32) if inp.dtype.kind == "f" else a.astype(inp.dtype)
    counts = {len(a) for a in stacked.values()}
    if len(counts) != 1 or 0 in counts:
        raise ConversionError(f"calibration arrays must all hold the same number (> 0) of samples, got {sorted(counts)}")
    n = counts.pop()
    per_sample = sum(int(np.prod(a.shape[1:])) for a in stacked.values())
    limit = min(max_samples, max(MIN_SAMPLES, CALIBRATION_ELEMENTS // max(per_sample, 1)))
    pick = np.unique(np.linspace(0, n - 1, min(n, max(1, limit))).round().astype(int))
    return {k: np.ascontiguousarray(v[pick]) for k, v in stacked.items()}


def convert(onnx_path: Path, calibration: dict[str, np.ndarray], work_dir: Path, *, per_channel: bool = True,
            timeout_s: float = 900, max_samples: int = MAX_SAMPLES, cache_dir: Path | None = DEFAULT_CACHE,
            precisions: tuple[str, ...] = ("int8",)) -> OnnxTFResult:
    """Run the onnx2tf route; see the module docstring. ``precisions``: "int8"
    and/or the float twins "fp16", "fp32" (without "int8", ``tflite`` is the
    first float one and nothing is quantized). Raises ConverterUnavailable
    (no venv), UnsupportedOp (an operator onnx2tf or the int8 converter cannot
    take, named) or ConversionError (any other step, named)."""
    import time

    python = require_venv()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConversionError(f"{onnx_path}: no such model file")
    inputs, _ = _onnx_inputs(onnx_path)
    samples = calibration_samples(inputs, calibration, max_samples)
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calib.npz", **samples)
    job = {
        "source": str(onnx_path.resolve()), "calibration": str(work / "calib.npz"),
        "shapes": {k: list(v.shape[1:]) for k, v in samples.items()}, "work_dir": str(work),
        "cache_dir": str(cache_dir) if cache_dir else "", "output": str(work / f"{onnx_path.stem}_int8.tflite"),
        "per_channel": per_channel, "precisions": list(precisions),
    }
    (work / "job.json").write_text(json.dumps(job, indent=1))
    (work / "result.json").unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    log_path = work / "worker.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), str(WORKER), str(work / "job.json")], stdout=log, stderr=subprocess.STDOUT,
                                cwd=work, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ConversionError(
                f"{onnx_path.name}: onnx2tf route took longer than {timeout_s:.0f} s (step {_last_step(log_path)!r}); "
                f"log: {log_path}. {INSTEAD}") from None
        finally:  # on a timeout or an interrupt, end the worker and whatever it started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - start
    result_file = work / "result.json"
    if not result_file.is_file():
        tail = [ln for ln in log_path.read_text(errors="replace").strip().splitlines()
                if ln.strip() and not ln.startswith(("I0000", "W0000", "E0000", "WARNING: All log"))][-3:]
        how = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"exited with code {proc.returncode}"
        raise ConversionError(f"{onnx_path.name}: the onnx2tf worker {how} at step "
                              f"{_last_step(log_path)!r} without a result: {' | '.join(tail)[-400:]}. {INSTEAD}")
    result = json.loads(result_file.read_text())
    if not result.get("ok"):
        raise _failure(onnx_path, result, work)
    return OnnxTFResult(tflite=Path(result["tflite"]), backend=result["backend"], io=result["io"],
                        cached_float=bool(result["cached_float"]), calibration_samples=int(result["calibration_samples"]),
                        seconds=seconds, details=result,
                        float_tflite={k: Path(v) for k, v in (result.get("float_tflite") or {}).items()})


def onnx_to_tflite_int8(onnx_path: Path, calibration: dict[str, np.ndarray], work_dir: Path, *,
                        per_channel: bool = True, timeout_s: float = 900) -> Path:
    """A full-integer int8 .tflite of ``onnx_path`` with the ONNX input and output
    names, order, shapes and layouts (int8 I/O with scale/zero point; float I/O
    where int8 I/O cannot be had). Details are in ``work_dir/result.json``."""
    return convert(onnx_path, calibration, work_dir, per_channel=per_channel, timeout_s=timeout_s).tflite


def _last_step(log_path: Path) -> str:
    steps = [ln[5:].strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("STEP ")]
    return steps[-1] if steps else "start"


def _failure(onnx_path: Path, result: dict[str, Any], work: Path) -> ConversionError:
    what = {"prepare": "preparing the ONNX graph", "float": "onnx2tf float conversion",
            "wrap": "matching inputs/outputs to the ONNX layouts", "float-check": "checking the float model",
            "float-tflite": "writing the float TFLite",
            "quantize": "TFLite int8 quantization", "names": "naming the TFLite inputs/outputs"}.get(
        result.get("step", ""), "the onnx2tf route")
    op = result.get("op_type") or ""
    node = result.get("node") or ""
    blame = f" on operator {op}" + (f" (node {node!r})" if node else "") if op else ""
    message = (f"{onnx_path.name}: {what} failed{blame}: {result.get('message', '')} "
               f"(log: {work / 'onnx2tf.log'}). {INSTEAD}")
    return UnsupportedOp(message) if result.get("kind") == "unsupported_op" and op else ConversionError(message)


if __name__ == "__main__":  # python -m converters.onnx_tf MODEL.onnx CALIB.npz WORKDIR
    with np.load(sys.argv[2]) as data:
        calib = {k: data[k] for k in data.files}
    res = convert(Path(sys.argv[1]), calib, Path(sys.argv[3]))
    print(json.dumps({"tflite": str(res.tflite), "backend": res.backend, "io": res.io, "seconds": round(res.seconds, 1),
                      "timings": res.details.get("timings")}, indent=1))
