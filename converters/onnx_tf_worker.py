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
1. prepare: fix every input to its static calibration shape, simplify with
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
from onnx_tf_tflite import QuantizeError, inspect_tflite, quantize, rename_io  # noqa: E402

COSINE_FLOAT_MIN = 0.999  # the float SavedModel against onnxruntime
CHECK_SAMPLES = 2
CACHE_ENTRIES = 8  # float SavedModels kept under the cache folder (tens of MB each)


class StepError(Exception):
    """A failed step, with the ONNX operator when one is known."""

    def __init__(self, step: str, message: str, *, kind: str = "conversion", op_type: str = "", node: str = "") -> None:
        super().__init__(message)
        self.step, self.kind, self.op_type, self.node = step, kind, op_type, node


CURRENT_STEP = {"name": "start"}  # the step main() names when something unexpected fails


def step(name: str) -> None:
    CURRENT_STEP["name"] = name
    print(f"STEP {name}", flush=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


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


# ---------------------------------------------------------------- 3. wrap in ONNX layouts
# (4. quantize and 5. names: onnx_tf_tflite.py)
def candidate_perms(tf_shape: list[int], onnx_shape: list[int]) -> list[tuple[int, ...] | None]:
    """Transposes that take the SavedModel tensor to the ONNX shape: identity
    first, then channel-last back to channel-first, then any other matching one."""
    import itertools

    r = len(onnx_shape)
    if len(tf_shape) != r:
        return []
    perms: list[tuple[int, ...] | None] = []
    if list(tf_shape) == list(onnx_shape):
        perms.append(None)
    if r >= 3:
        to_first = (0, r - 1, *range(1, r - 1))  # NHWC -> NCHW
        if [tf_shape[i] for i in to_first] == list(onnx_shape) and to_first not in perms:
            perms.append(to_first)
    if r <= 5:
        for p in itertools.permutations(range(r)):
            if p != tuple(range(r)) and [tf_shape[i] for i in p] == list(onnx_shape) and p not in perms:
                perms.append(p)
    return perms


def build_wrapper(saved: Path, onnx_inputs: dict[str, list[int]], onnx_outputs: list[str],
                  reference: list[dict[str, np.ndarray]], samples: list[dict[str, np.ndarray]]) -> tuple[Any, dict]:
    """A tf.Module whose ``serve`` takes in_0.. in ONNX layout and returns out_0.."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved))
    sig = loaded.signatures["serving_default"]
    sig_inputs = sig.structured_input_signature[1]
    sig_outputs = sig.structured_outputs
    in_map: dict[str, str] = {}
    for name in onnx_inputs:
        match = [k for k in sig_inputs if k == name or sig_inputs[k].name == name
                 or re.sub(r"[^A-Za-z0-9_]", "_", k) == re.sub(r"[^A-Za-z0-9_]", "_", name)]
        if not match and len(onnx_inputs) == 1 and len(sig_inputs) == 1:
            match = list(sig_inputs)
        if not match:
            raise StepError("wrap", f"ONNX input {name!r} not among the SavedModel inputs {sorted(sig_inputs)}")
        in_map[name] = match[0]
    in_perm: dict[str, tuple[int, ...] | None] = {}
    for name, shape in onnx_inputs.items():
        tf_shape = [int(d) for d in sig_inputs[in_map[name]].shape]
        perms = candidate_perms(tf_shape, shape)
        if not perms:
            raise StepError("wrap", f"input {name!r}: SavedModel shape {tf_shape}, ONNX {shape}")
        # perms map TF->ONNX; the input needs ONNX->TF: the inverse
        p = perms[0]
        in_perm[name] = None if p is None else tuple(int(i) for i in np.argsort(p))

    def call(feed: dict[str, Any]) -> dict[str, Any]:
        args = {in_map[n]: (v if in_perm[n] is None else tf.transpose(v, in_perm[n])) for n, v in feed.items()}
        return sig(**args)

    # Match SavedModel outputs to ONNX outputs (by name, else by order) and pick their transposes numerically.
    got = [call({n: tf.constant(s[n]) for n in onnx_inputs}) for s in samples]
    keys = list(sig_outputs)
    out_map: dict[str, str] = {}
    for i, name in enumerate(onnx_outputs):
        match = [k for k in keys if k == name or re.sub(r"[^A-Za-z0-9_]", "_", k) == re.sub(r"[^A-Za-z0-9_]", "_", name)]
        out_map[name] = match[0] if match else (keys[i] if len(keys) == len(onnx_outputs) else "")
        if not out_map[name]:
            raise StepError("wrap", f"ONNX output {name!r} not among the SavedModel outputs {keys}")
    out_perm: dict[str, tuple[int, ...] | None] = {}
    check: dict[str, float] = {}
    for name in onnx_outputs:
        ref = [r[name] for r in reference]
        tf_shape = [int(d) for d in got[0][out_map[name]].shape]
        best, best_cos = None, -2.0
        for p in candidate_perms(tf_shape, list(ref[0].shape)):
            outs = [np.asarray(g[out_map[name]]) if p is None else np.transpose(np.asarray(g[out_map[name]]), p) for g in got]
            c = min(cosine(o, r) for o, r in zip(outs, ref))
            if c > best_cos:
                best, best_cos = p, c
        if best_cos == -2.0:
            raise StepError("wrap", f"output {name!r}: SavedModel shape {tf_shape}, ONNX {list(ref[0].shape)}")
        out_perm[name], check[name] = best, best_cos
    bad = {k: v for k, v in check.items() if v < COSINE_FLOAT_MIN}
    if bad:
        raise StepError("float-check", "the float model onnx2tf wrote disagrees with onnxruntime: "
                        + ", ".join(f"{k} cosine {v:.4f}" for k, v in bad.items()))

    specs = [tf.TensorSpec(shape, tf.as_dtype(samples[0][n].dtype), name=f"in_{i}")
             for i, (n, shape) in enumerate(onnx_inputs.items())]
    names = list(onnx_inputs)

    class Wrapper(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = loaded

        @tf.function(input_signature=specs)
        def serve(self, *args: Any) -> dict[str, Any]:
            outs = call(dict(zip(names, args)))
            return {f"out_{i}": (outs[out_map[n]] if out_perm[n] is None else tf.transpose(outs[out_map[n]], out_perm[n]))
                    for i, n in enumerate(onnx_outputs)}

    return Wrapper(), {"float_cosine": check, "input_transposes": {k: v for k, v in in_perm.items() if v},
                       "output_transposes": {k: v for k, v in out_perm.items() if v}}


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

    step("quantize")
    t = time.monotonic()
    try:
        model_bytes, io_mode = quantize(wrapper, work, samples, names, bool(job.get("per_channel", True)), log_path)
    except QuantizeError as exc:
        raise StepError("quantize", str(exc), kind="unsupported_op" if exc.op_type else "conversion",
                        op_type=exc.op_type) from None
    timings["quantize"] = time.monotonic() - t

    step("names")
    out = Path(job["output"])
    out.write_bytes(rename_io(model_bytes, names, out_names))
    details = inspect_tflite(out)
    timings["total"] = time.monotonic() - t0
    return {"ok": True, "tflite": str(out), "backend": backend, "cached_float": cached, "io": io_mode,
            "calibration_samples": n, "prepare": info, "timings": timings, **layout, **details}


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
