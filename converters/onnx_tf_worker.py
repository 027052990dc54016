"""ONNX -> full-integer int8 TFLite with onnx2tf, run INSIDE build/tf-venv by
``converters.onnx_tf`` (never imported by edged itself: onnx2tf, TensorFlow and
onnxruntime here are the build venv's).

Usage: ``python onnx_tf_worker.py JOB.json``. The job names the source model,
a calibration ``.npz`` (one array per ONNX input, samples along a new leading
axis, each sample with the model's static input shape), the work and cache
folders and the options. The worker prints ``STEP <name>`` lines as it goes and
writes ``result.json`` into the work folder: ``{"ok": true, "tflite": ...}`` or
``{"ok": false, "kind": "unsupported_op" | "conversion", "step", "op_type",
"node", "message"}``.

Steps:
1. prepare: fix every input to its static calibration shape, replace each If
   that the static shapes decide by its branch (``fold.py``), simplify with
   onnxsim (constant folding of shape arithmetic), give nodes names TensorFlow
   accepts.
2. float: onnx2tf writes a float SavedModel, cached per source sha256, shapes
   and onnx2tf version under the cache folder. First its fast
   ``flatbuffer_direct`` backend (inputs kept NCHW), else the legacy
   ``tf_converter`` backend (inputs become NHWC).
3. wrap: a tf.function with the ONNX inputs and outputs in the ONNX layouts
   (transposes where onnx2tf went channel-last), checked against onnxruntime on
   calibration samples; a float result that disagrees stops here.
4. quantize: TFLiteConverter, full-integer int8 (int8 kernels only, int8 I/O;
   float I/O when int8 I/O fails), calibrated on the samples.
5. names: the TFLite inputs and outputs get the ONNX names, in the ONNX order.

The job's ``precisions`` (default ``["int8"]``) may also ask for ``fp16`` and
``fp32`` TFLite twins of the same wrapped model (written before quantizing,
float I/O, ONNX names; ``float_tflite`` in the result); without ``int8`` no
quantization runs and ``tflite`` is the first float one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from onnx_tf_patches import patch_onnx2tf  # noqa: E402 - this folder is sys.path[0] when run as a script
from onnx_tf_wrap import StepError, build_wrapper  # noqa: E402
from onnx_tf_tflite import QuantizeError, float_tflite, inspect_tflite, quantize, rename_io, save_wrapped  # noqa: E402

CHECK_SAMPLES = 2
CACHE_ENTRIES = 8  # float SavedModels kept under the cache folder (tens of MB each)


CURRENT_STEP = {"name": "start"}  # the step main() names when something unexpected fails


def step(name: str) -> None:
    CURRENT_STEP["name"] = name
    print(f"STEP {name}", flush=True)


# ---------------------------------------------------------------- 1. prepare
def prepare(source: Path, shapes: dict[str, list[int]], dest: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(source))
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        shape = shapes[inp.name]
        if len(dims) != len(shape):
            raise StepError("prepare", f"input {inp.name!r} has rank {len(dims)}, calibration samples {shape}")
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    del model.graph.value_info[:]
    for out in model.graph.output:  # let shape inference fill them from the static inputs
        for dim in out.type.tensor_type.shape.dim:
            dim.Clear()
    folded = fold_static_ifs(model)
    if folded is not None:
        model = folded
    simplified = False
    try:
        import onnxsim

        trial = onnx.ModelProto()
        trial.CopyFrom(model)  # onnxsim may rewrite its argument (in-memory external data)
        model_s, ok = onnxsim.simplify(trial)
        if ok and loads(model_s):
            model, simplified = model_s, True
        else:
            print("onnxsim's result does not check or load; converting the unsimplified model", flush=True)
    except Exception as exc:  # onnxsim fails on some graphs; onnx2tf copes without
        print(f"onnxsim failed, converting the unsimplified model: {type(exc).__name__}: {exc}", flush=True)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_./-]*", node.name) or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(model, str(dest))
    return {"simplified": simplified, "op_types": sorted({n.op_type for n in model.graph.node})}


def fold_static_ifs(model: Any) -> Any | None:
    """The model with each If whose condition the static shapes decide replaced by
    its branch (``fold.py``; onnxsim and onnx2tf cannot take such an If), or None."""
    try:
        from fold import fold_model

        folded = fold_model(model, {}, static_shapes=True)
    except Exception as exc:  # the fold is a help, not a step: convert the model as it is
        print(f"folding If nodes on static shapes failed: {type(exc).__name__}: {exc}", flush=True)
        return None
    if folded is not None:
        left = sum(1 for n in folded.graph.node if n.op_type == "If")
        print(f"folded If nodes decided by the static shapes ({left} left)", flush=True)
    return folded


def loads(model: Any) -> bool:
    """Whether onnxruntime can load ``model``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT 1.26's optimizers break some static graphs
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def ort_error(exc: Exception) -> StepError:
    """onnxruntime refusing the static graph, with the operator and node it names."""
    text = str(exc)
    found = re.search(r"implementation for (\w+)\(\d+\) node with name '([^']*)'", text)
    op_type, node = (found.group(1), found.group(2)) if found else ("", "")
    if not found and (found := re.search(r"Node \(([^)]*)\) Op \((\w+)\)", text)):
        node, op_type = found.group(1), found.group(2)
    if not found and (found := re.search(r"([\w.]+:\w+)\(-?\d+\) is not a registered", text)):
        op_type = found.group(1)
    first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", (text.strip().splitlines() or [""])[0])
    return StepError("prepare", f"onnxruntime cannot run the model with static input shapes: {first[:300]}",
                     kind="unsupported_op" if op_type else "conversion", op_type=op_type, node=node)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- 2. float SavedModel
def onnx_error(log: str, model_path: Path) -> tuple[str, str]:
    """(op_type, node name) that onnx2tf's log blames, or ("", "")."""
    import onnx

    nodes = {n.name: n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node}
    node = ""
    for pattern in (r"onnx_op_name:\s*(\S+)", r"node(?:_name)?[=:]\s*'?([A-Za-z0-9_./@-]+)", r"op_name[=:]\s*'?([A-Za-z0-9_./@-]+)"):
        found = re.findall(pattern, log)
        if found:
            node = found[-1].strip("'\",")
            break
    op_type = nodes.get(node, "")
    if not op_type:
        found = re.findall(r"onnx_op_type:\s*(\S+)", log) or re.findall(r"op_type[=:]\s*'?([A-Za-z0-9_]+)", log)
        op_type = found[-1] if found else ""
    if not op_type:  # a builder named after the ONNX op in the traceback, e.g. build_softmax_op / ops/LSTM.py
        found = re.findall(r"onnx2tf/ops/([A-Za-z0-9]+)\.py", log) or [
            b for b in re.findall(r"in build_([a-z0-9_]+?)_op", log)]
        op_type = found[-1] if found else ""
    return op_type, node


def error_line(log: str) -> str:
    """The most specific exception line of a log: the first raised (the root cause),
    not the wrappers raised from it."""
    lines = [ln.strip() for ln in log.splitlines() if re.match(r"\s*[\w.]*(Error|Exception)\b[^:]*: ", ln)]
    generic = ("fast path failed", "Exception encountered when calling layer", "in user code")
    specific = [ln for ln in lines if not any(g in ln for g in generic)]
    line = (specific or lines or [""])[0]
    line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
    return re.sub(r"^[\w.]*\.(\w+(Error|Exception))", r"\1", line)


def run_onnx2tf(prepared: Path, out: Path, backend: str, inputs: list[str], log_path: Path, simplified: bool) -> Path:
    """onnx2tf.convert into ``out``; returns the SavedModel folder."""
    import contextlib
    import io

    import onnx2tf

    patch_onnx2tf()
    kwargs: dict[str, Any] = dict(
        input_onnx_file_path=str(prepared), output_folder_path=str(out), tflite_backend=backend,
        output_signaturedefs=True, copy_onnx_input_output_names_to_tflite=True, verbosity="info",
        not_use_onnxsim=simplified,  # prepare ran onnxsim already
    )
    if backend == "flatbuffer_direct":
        # enable_rnn_unroll: LSTM/GRU as plain ops over the (static) sequence; a WHILE loop
        # crashes TFLite's int8 calibration.
        kwargs.update(flatbuffer_direct_output_saved_model=True, keep_ncw_or_nchw_or_ncdhw_input_names=inputs,
                      enable_rnn_unroll=True)
    buf = io.StringIO()
    failure: BaseException | None = None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            onnx2tf.convert(**kwargs)
        except BaseException as exc:  # onnx2tf calls sys.exit(1) on some errors
            failure = exc
            traceback.print_exc(file=buf)
    log = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())
    with open(log_path, "a") as f:
        f.write(f"\n===== onnx2tf backend={backend}\n{log}")
    for candidate in (out / "saved_model", out):
        if (candidate / "saved_model.pb").is_file():
            if failure is not None:
                print(f"onnx2tf ({backend}) raised after writing the SavedModel: {failure!r}", flush=True)
            return candidate
    op_type, node = onnx_error(log, prepared)
    message = (error_line(log) or repr(failure) or "no SavedModel written")[:500]
    raise StepError("float", f"onnx2tf ({backend}): {message}", kind="unsupported_op" if op_type else "conversion",
                    op_type=op_type, node=node)


def prune_cache(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used cache entries."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and ".tmp" not in p.name),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def float_saved_model(job: dict[str, Any], prepared: Path, inputs: list[str], log_path: Path,
                      simplified: bool) -> tuple[Path, str, bool]:
    """(SavedModel folder, backend, from cache)."""
    import onnx2tf

    version = getattr(onnx2tf, "__version__", "")
    key_src = json.dumps([sha256_file(Path(job["source"])), job["shapes"], version, 5], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    cache = Path(job["cache_dir"]) / key if job.get("cache_dir") else None
    if cache is not None and (cache / "saved_model" / "saved_model.pb").is_file():
        os.utime(cache)  # most recently used: pruned last
        return cache / "saved_model", (cache / "backend").read_text().strip(), True
    errors: list[StepError] = []
    for backend in ("flatbuffer_direct", "tf_converter"):
        out = Path(job["work_dir"]) / f"onnx2tf-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            saved = run_onnx2tf(prepared, out, backend, inputs, log_path, simplified)
        except StepError as exc:
            errors.append(exc)
            print(f"onnx2tf backend {backend} failed: {exc}", flush=True)
            continue
        if cache is None:
            return saved, backend, False
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copytree(saved, tmp / "saved_model")
        (tmp / "backend").write_text(backend)
        try:
            tmp.rename(cache)
        except OSError:  # another run filled it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        prune_cache(cache.parent, keep=CACHE_ENTRIES)
        return cache / "saved_model", backend, False
    blamed = next((e for e in reversed(errors) if e.op_type), errors[-1])
    raise StepError("float", "; ".join(str(e) for e in errors), kind=blamed.kind, op_type=blamed.op_type, node=blamed.node)


# ---------------------------------------------------------------- 3. wrap: onnx_tf_wrap.py
# ---------------------------------------------------------------- main
def run(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "onnx2tf.log"
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with np.load(job["calibration"]) as data:
        calib = {k: data[k] for k in data.files}
    names = list(job["shapes"])
    n = len(calib[names[0]])
    samples = [{k: np.asarray(calib[k][i]) for k in names} for i in range(n)]

    step("prepare")
    prepared = work / "prepared.onnx"
    info = prepare(Path(job["source"]), job["shapes"], prepared)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT 1.26's optimizers break some static graphs
    try:
        session = ort.InferenceSession(str(prepared), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # the reference for every check: name the node onnxruntime refused
        raise ort_error(exc) from None
    out_names = [o.name for o in session.get_outputs()]
    check = samples[:CHECK_SAMPLES]
    reference = [dict(zip(out_names, session.run(out_names, s))) for s in check]
    timings["prepare"] = time.monotonic() - t0

    step("float")
    t = time.monotonic()
    float_inputs = [k for k in names if len(job["shapes"][k]) in (3, 4, 5)]
    saved, backend, cached = float_saved_model(job, prepared, float_inputs, log_path, info["simplified"])
    timings["float"] = time.monotonic() - t

    step("wrap")
    t = time.monotonic()
    wrapper, layout = build_wrapper(saved, job["shapes"], out_names, reference, check)
    timings["wrap"] = time.monotonic() - t

    saved_wrapped = save_wrapped(wrapper, work)
    precisions = list(job.get("precisions") or ["int8"])
    out = Path(job["output"])
    floats: dict[str, str] = {}
    for precision in (p for p in precisions if p in ("fp16", "fp32")):
        step(f"float-tflite {precision}")
        t = time.monotonic()
        path = out.with_name(f"{out.stem.removesuffix('_int8')}_{precision}.tflite")
        try:
            path.write_bytes(rename_io(float_tflite(saved_wrapped, precision), names, out_names))
        except Exception as exc:  # the float twin is optional: say why it is missing
            print(f"float TFLite {precision} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        floats[precision] = str(path)
        timings[f"float_tflite_{precision}"] = time.monotonic() - t
    result = {"ok": True, "backend": backend, "cached_float": cached, "calibration_samples": n, "prepare": info,
              "timings": timings, "float_tflite": floats, **layout}
    if "int8" not in precisions:
        if not floats:
            raise StepError("float-tflite", f"TensorFlow's converter wrote no {'/'.join(precisions)} TFLite (see the log)")
        first = floats[precisions[0]] if precisions[0] in floats else next(iter(floats.values()))
        timings["total"] = time.monotonic() - t0
        return {**result, "tflite": first, "io": "float", **inspect_tflite(Path(first))}

    step("quantize")
    t = time.monotonic()
    try:
        model_bytes, io_mode = quantize(saved_wrapped, samples, names, bool(job.get("per_channel", True)), log_path)
    except QuantizeError as exc:
        raise StepError("quantize", str(exc), kind="unsupported_op" if exc.op_type else "conversion",
                        op_type=exc.op_type) from None
    timings["quantize"] = time.monotonic() - t

    step("names")
    out.write_bytes(rename_io(model_bytes, names, out_names))
    details = inspect_tflite(out)
    timings["total"] = time.monotonic() - t0
    return {**result, "tflite": str(out), "io": io_mode, **details}


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(job["work_dir"]) / "result.json"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        result = run(job)
    except StepError as exc:
        result = {"ok": False, "kind": exc.kind, "step": exc.step, "op_type": exc.op_type, "node": exc.node,
                  "message": str(exc)}
    except Exception as exc:  # anything else: name the step the STEP lines reached
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "onnxruntime: ", first)
        result = {"ok": False, "kind": "conversion", "step": CURRENT_STEP["name"], "op_type": "", "node": "",
                  "message": f"{type(exc).__name__}: {first[:400]}"}
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
