"""Fold a constant non-float scalar input into the ONNX graph, and the ``If``
nodes it decides.

Silero VAD takes ``sr`` (an int64 scalar, 16000 or 8000) only to pick one of
two ``If`` branches; OpenVINO and onnx2tf cannot take that ``If``. When every
calibration (and holdout) sample holds the same value of such an input, the
input becomes a constant, the nodes between it and an ``If`` condition are
evaluated (onnx's reference evaluator), and each ``If`` with a known
condition is replaced by the branch it takes. The fold is kept only when it
removes an ``If``. The pipeline folds for OpenVINO and TFLite targets only
(onnxruntime runs the If); their bundle then has no such input (the value is
in the report's notes and the provenance).

With ``static_shapes`` (the onnx2tf worker, whose inputs are fully static),
``Shape`` of a tensor whose inferred shape is static is known too, so an
``If`` on a dimension (``if x.shape[0] == 1: squeeze``) folds as well.

    source, data, note = fold_for_target(source, data, workdir)   # copies, for OpenVINO and TFLite
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the onnx2tf worker imports this module in build/tf-venv, without edged
    from converters.data import Samples

MAX_FOLDS = 64  # If nodes inlined per model (nested ones included); a guard against a runaway loop


def constant_scalars(source: Any, sample_sets: list["Samples"]) -> dict[str, np.ndarray]:
    """Non-float inputs of one element whose value is the same in every sample of every set."""
    found: dict[str, np.ndarray] = {}
    for spec in source.inputs:
        if spec.is_float:
            continue
        arrays = [s.arrays[spec.name] for s in sample_sets if spec.name in s.arrays]
        if not arrays or any(a.size != len(a) for a in arrays):  # one element per sample
            continue
        values = np.concatenate([a.reshape(-1) for a in arrays])
        if len(values) and np.all(values == values[0]):
            shape = tuple(d for d in spec.shape if d > 0) if len(spec.shape) else ()
            found[spec.name] = np.asarray(values[0], dtype=np.dtype(spec.dtype)).reshape(shape)
    return found


def fold_for_target(source: Any, data: Any, workdir: Path) -> tuple[Any, Any, str]:
    """(source, data, note) for one target: copies with the constant scalar
    inputs folded and dropped from the samples, or the same ones and "" when
    nothing folds (``data`` is the pipeline's ``ConversionData``)."""
    import dataclasses

    copy = dataclasses.replace(source, inputs=list(source.inputs), notes=list(source.notes), _session=None)
    folded = fold_constant_inputs(copy, [data.calibration, data.validation], workdir)
    if not folded:
        return source, data, ""
    data = dataclasses.replace(data, calibration=drop_inputs(data.calibration, folded),
                               validation=drop_inputs(data.validation, folded))
    return copy, data, copy.notes[-1]


def fold_constant_inputs(source: Any, sample_sets: list["Samples"], workdir: Path) -> dict[str, np.ndarray]:
    """Fold the constant scalar inputs of an ONNX ``source`` that decide an
    ``If`` (see the module docstring); updates ``source`` in place and returns
    what was folded ({} when nothing was)."""
    if source.kind != "onnx":
        return {}
    import onnx

    model = onnx.load(str(source.path))
    if not any(n.op_type == "If" for n in model.graph.node):
        return {}
    values = constant_scalars(source, sample_sets)
    if not values:
        return {}
    folded = fold_model(model, values)
    if folded is None:
        return {}
    path = Path(workdir) / f"folded-{source.original.name}"
    onnx.save(folded, str(path))
    if source.static_path is not None and source.static_path != source.path:
        static = fold_model(onnx.load(str(source.static_path)), values)
        source.static_path = None
        if static is not None:
            source.static_path = Path(workdir) / f"folded-static-{source.original.name}"
            onnx.save(static, str(source.static_path))
    elif source.static_path is not None:
        source.static_path = path
    source.path = path
    source.inputs = [i for i in source.inputs if i.name not in values]
    source._session = None  # noqa: SLF001 - the next run loads the folded model
    text = ", ".join(f"{k}={v.tolist()}" for k, v in values.items())
    source.notes.append(f"input(s) {text} hold one value in all the data: folded into the model as constant(s), "
                        "with the If branch they select (this runtime cannot take that If); the bundle has no "
                        "such input")
    return values


def drop_inputs(samples: "Samples", names: dict[str, Any]) -> "Samples":
    from converters.data import Samples

    return Samples({k: v for k, v in samples.arrays.items() if k not in names}, samples.labels)


def fold_model(model: Any, values: dict[str, np.ndarray], static_shapes: bool = False) -> Any | None:
    """A copy of ``model`` with ``values`` as initializers and every ``If`` whose
    condition they decide inlined; None when no ``If`` went away."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())
    inlined = 0
    for _ in range(MAX_FOLDS * 16):
        step = _fold_once(out, static_shapes)
        if not step:
            break
        inlined += step == "inlined"
        if inlined >= MAX_FOLDS:
            break
    if not inlined:
        return None
    _prune(graph)
    del graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out)
        onnx.checker.check_model(out)
    except Exception:  # a fold that does not check is no fold
        return None
    return out


def _static_dims(model: Any) -> dict[str, list[int]]:
    """Tensor name -> shape, for every tensor whose inferred shape is fully static."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    dims: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shape = vi.type.tensor_type.shape
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and all(
                d.HasField("dim_value") and d.dim_value > 0 for d in shape.dim):
            dims[vi.name] = [int(d.dim_value) for d in shape.dim]
    return dims


def _known(graph: Any, static: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    from onnx import helper, numpy_helper

    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node if static else []:
        if node.op_type == "Shape" and node.input[0] in static:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dims = static[node.input[0]]
            known[node.output[0]] = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            try:
                known[node.output[0]] = _evaluate(node, {}, [])
            except Exception:  # an attribute form the evaluator does not take: not known
                continue
    return known


def _cond_ancestors(graph: Any) -> set[int]:
    """Indices of the nodes an If condition depends on."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    todo = [n.input[0] for n in graph.node if n.op_type == "If"]
    seen: set[int] = set()
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        todo.extend(x for x in graph.node[i].input if x)
    return seen


def _fold_once(model: Any, static_shapes: bool = False) -> str:
    """One step: inline the first If with a known condition, else evaluate one
    node on the path to an If condition whose inputs are all known."""
    from onnx import numpy_helper

    graph = model.graph
    known = _known(graph, _static_dims(model) if static_shapes else None)
    for index, node in enumerate(graph.node):
        if node.op_type == "If" and node.input[0] in known:
            _inline(graph, index, bool(np.asarray(known[node.input[0]]).reshape(-1)[0]))
            return "inlined"
    for index in sorted(_cond_ancestors(graph)):
        node = graph.node[index]
        if node.op_type in ("Constant", "If", "Shape") or any(a.type in (5, 10) for a in node.attribute):
            continue
        if all(x in known for x in node.input if x) and not all(o in known for o in node.output):
            try:
                results = _evaluate(node, known, list(model.opset_import))
            except Exception:  # the evaluator cannot run it: leave it
                continue
            graph.initializer.extend(numpy_helper.from_array(np.asarray(r), o)
                                     for o, r in zip(node.output, results if isinstance(results, list) else [results]))
            del graph.node[index]
            return "evaluated"
    return ""


def _evaluate(node: Any, known: dict[str, np.ndarray], opsets: list[Any]) -> Any:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "Constant":
        return ReferenceEvaluator(helper.make_model(helper.make_graph(
            [node], "c", [], [helper.make_empty_tensor_value_info(node.output[0])]))).run(None, {})[0]
    inputs = [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(np.asarray(known[x]).dtype), None)
              for x in dict.fromkeys(x for x in node.input if x)]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    model = helper.make_model(helper.make_graph([node], "n", inputs, outputs), opset_imports=opsets)
    return ReferenceEvaluator(model).run(None, {x.name: known[x.name] for x in inputs})


def _inline(graph: Any, index: int, cond: bool) -> None:
    """Replace the If at ``index`` by the nodes of the branch ``cond`` takes.
    Each branch output is renamed to the If output it becomes (a tensor keeps
    one name, which OpenVINO reports); names that clash with the outer graph
    get a suffix."""
    from onnx import helper

    node = graph.node[index]
    branch = next(a.g for a in node.attribute if a.name == ("then_branch" if cond else "else_branch"))
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer} | \
        {i.name for i in graph.input}
    suffix = f"__{node.name or 'if'}_{'then' if cond else 'else'}"
    produced = {o for n in branch.node for o in n.output}
    renames: dict[str, str] = {}
    outs = [o.name for o in branch.output]
    for branch_out, if_out in zip(outs, node.output):
        if branch_out in produced and outs.count(branch_out) == 1 and branch_out not in renames:
            renames[branch_out] = if_out
    for name in [o for n in branch.node for o in n.output] + [i.name for i in branch.initializer]:
        if name in taken and name not in renames:
            renames[name] = name + suffix
    new_nodes = []
    for n in branch.node:
        copy = helper.make_node("Identity", [], [])
        copy.CopyFrom(n)
        _rename_uses(copy, renames)
        for i, x in enumerate(copy.output):
            copy.output[i] = renames.get(x, x)
        new_nodes.append(copy)
    for init in branch.initializer:
        added = graph.initializer.add()
        added.CopyFrom(init)
        added.name = renames.get(init.name, init.name)
    for branch_out, if_out in zip(outs, node.output):
        if renames.get(branch_out) != if_out:
            new_nodes.append(helper.make_node("Identity", [renames.get(branch_out, branch_out)], [if_out],
                                              name=f"{node.name or 'if'}_out_{if_out}"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:index] + new_nodes + nodes[index + 1:])


def _rename_uses(node: Any, renames: dict[str, str]) -> None:
    """Rename what ``node`` reads, also inside its subgraphs (outer-scope reads)
    unless a subgraph defines that name itself."""
    for i, x in enumerate(node.input):
        node.input[i] = renames.get(x, x)
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []):
            local = {o for n in g.node for o in n.output} | {i.name for i in g.initializer} | {i.name for i in g.input}
            inner = {k: v for k, v in renames.items() if k not in local}
            for n in g.node:
                _rename_uses(n, inner)
            for out in g.output:
                out.name = inner.get(out.name, out.name)


def _prune(graph: Any) -> None:
    """Drop nodes and initializers nothing uses any more (subgraph uses count)."""
    def used_by(node: Any) -> set[str]:
        names = {x for x in node.input if x}
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []):
                for n in g.node:
                    names |= used_by(n)
        return names

    needed = {o.name for o in graph.output}
    nodes = list(graph.node)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= used_by(node)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
