"""Step 3 of the onnx2tf route, run inside build/tf-venv by ``onnx_tf_worker.py``:
wrap onnx2tf's float SavedModel in a tf.Module whose inputs and outputs are in
the ONNX layouts (transposes where onnx2tf went channel-last), checked against
onnxruntime on calibration samples. Also the worker's ``StepError``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

COSINE_FLOAT_MIN = 0.999  # the float SavedModel against onnxruntime


class StepError(Exception):
    """A failed step, with the ONNX operator when one is known."""

    def __init__(self, step: str, message: str, *, kind: str = "conversion", op_type: str = "", node: str = "") -> None:
        super().__init__(message)
        self.step, self.kind, self.op_type, self.node = step, kind, op_type, node


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


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
