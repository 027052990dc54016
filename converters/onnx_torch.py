"""An ONNX model as a ``torch.export`` program, so that ONNX CNNs can become
full-integer int8 TFLite through litert-torch (``converters.tflite_torch``).

Flow: fix the input to a static batch-1 shape; let onnxruntime's basic graph
optimizations fold constants (Constant nodes, shape arithmetic) and fuse
Conv+BatchNormalization, writing a plain ONNX file; ``onnx2torch.convert`` turns
it into an ``fx.GraphModule``; reshapes and resizes are made static
(``torch.export`` cannot trace onnx2torch's data-dependent versions);
``torch.export.export`` with a zero example. The result is checked against
onnxruntime on the original model before it is used.

What converts is what onnx2torch maps (Conv, Gemm, pooling, activations such as
HardSigmoid/HardSwish/Clip, elementwise arithmetic, Reshape/Flatten,
Softmax, ...) and what litert-torch then lowers. Anything else fails with
onnx2torch's or torch.export's message. Extra: ``convert-torch`` (torch,
litert-torch, onnx2torch).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import ConversionError, require

EXTRA = "convert-torch"


def available() -> bool:
    """True when torch, onnx2torch and litert-torch can all be imported."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in ("torch", "onnx2torch", "litert_torch", "onnxruntime"))


def static_copy(path: Path, shape: tuple[int, ...], workdir: Path) -> Path:
    """``path`` with its input fixed to ``shape`` and constants folded by
    onnxruntime's basic (standard-ONNX-only) optimizations."""
    onnx = require("onnx", EXTRA, "reading ONNX models")
    ort = require("onnxruntime", "onnx", "folding ONNX constants")
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ConversionError(f"{path.name}: input has {len(dims)} dims, expected {len(shape)}")
    for dim, size in zip(dims, shape):
        dim.Clear()
        dim.dim_value = int(size)
    del model.graph.value_info[:]
    fixed = workdir / "static.onnx"
    onnx.save(model, str(fixed))
    folded = workdir / "folded.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(fixed), options, providers=["CPUExecutionProvider"])
    return folded


def _static_shapes(gm: Any, example: Any) -> None:
    """Make onnx2torch's shape-taking modules static, since ``torch.export``
    cannot trace their data-dependent ``.tolist()``: a Reshape with a constant
    shape becomes ``torch.reshape`` with the concrete shape (0 copies the input's
    dim, as in ONNX); a Resize becomes ``F.interpolate`` to the output size that
    shape propagation found."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(example)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        kind = type(module).__name__
        data = node.args[0]
        if kind == "OnnxReshape" and getattr(node.args[1], "op", None) == "get_attr":
            target = [int(v) for v in _attr(gm, node.args[1].target).tolist()]
            in_shape = tuple(data.meta["tensor_meta"].shape)
            call = (torch.reshape, (data, tuple(in_shape[i] if v == 0 else v for i, v in enumerate(target))), {})
        elif kind in ("OnnxResize", "OnnxResizeV10"):
            from onnx2torch.node_converters.resize import _onnx_mode_to_torch_mode  # the module's own mapping

            resize = getattr(module, "_resize", module)
            size = tuple(int(d) for d in node.meta["tensor_meta"].shape[2:])
            try:
                mode = _onnx_mode_to_torch_mode(resize.onnx_mode, len(size))
            except NotImplementedError:
                continue
            call = (torch.nn.functional.interpolate, (data,),
                    {"size": size, "mode": mode, "align_corners": resize.align_corners})
        else:
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(call[0], call[1], call[2])
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def onnx_program(path: Path, shape: tuple[int, ...]) -> Any:
    """A ``torch.export.ExportedProgram`` equivalent to the ONNX model at ``path``
    with its input fixed to ``shape`` (batch 1)."""
    torch = require("torch", EXTRA, "ONNX to PyTorch conversion")
    onnx = require("onnx", EXTRA, "reading ONNX models")
    onnx2torch = require("onnx2torch", EXTRA, "ONNX to PyTorch conversion")
    ort = require("onnxruntime", "onnx", "checking the converted model")
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="edged-onnx2torch-") as tmp:
        folded = static_copy(path, shape, Path(tmp))
        try:
            gm = onnx2torch.convert(onnx.load(str(folded)))
        except Exception as exc:
            raise ConversionError(f"{path.name}: onnx2torch cannot convert it: {type(exc).__name__}: {exc}") from None
    gm.eval()
    example = torch.zeros(shape, dtype=torch.float32)
    try:
        with torch.no_grad():
            _static_shapes(gm, example)
            program = torch.export.export(gm, (example,))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConversionError(f"{path.name}: torch.export of the onnx2torch model failed: {type(exc).__name__}: {first}") from None
    # The translated model must compute what onnxruntime computes on the original.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).random(shape, dtype=np.float32)
    want = session.run(None, {session.get_inputs()[0].name: probe})[0]
    with torch.no_grad():
        got = program.module()(torch.from_numpy(probe))
    got = (got[0] if isinstance(got, (list, tuple)) else got).numpy()
    scale = max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or float(np.abs(got - want).max()) > 1e-3 * scale:
        raise ConversionError(
            f"{path.name}: the onnx2torch translation disagrees with onnxruntime "
            f"(shape {got.shape} vs {want.shape}); it cannot be converted to TFLite this way"
        )
    return program
