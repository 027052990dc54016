"""Which nodes of an int8 QDQ graph cost the accuracy: onnxruntime's
quantization debugging (``qdq_loss_debug``) on a few calibration samples.

Both the prepared float graph and the QDQ graph save every activation; each
tensor's SQNR against float (``compute_activation_error``'s ``xmodel_err``)
is propagated through the graph, and a node is scored by the relative noise
power it adds: 10^(-SQNR_out/10) - 10^(-SQNR_in/10). A node that turns a
33 dB input into a 2 dB output (a Log after a quantized power spectrum)
scores far above a convolution that takes a clean input to 29 dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.data import Samples

UPSTREAM_DEPTH = 4  # how far up a sensitive node's inputs the float candidates reach
SQNR_CAP_DB = 120.0  # a tensor that is not quantized anywhere upstream
MIN_NOISE = 1e-4  # nodes adding less relative noise power are not worth keeping in float


@dataclass
class NodeLoss:
    node: str
    op_type: str
    sqnr_in_db: float
    sqnr_out_db: float
    added_noise: float  # relative noise power this node adds
    group: list[str] = field(default_factory=list)  # node, then the nodes upstream that quantize its inputs

    def why(self) -> str:
        return (f"{self.node} ({self.op_type}): SQNR against fp32 falls from {self.sqnr_in_db:.1f} dB "
                f"to {self.sqnr_out_db:.1f} dB across it in int8")


@dataclass
class Ranking:
    losses: list[NodeLoss]  # worst first
    output_nodes: list[str] = field(default_factory=list)  # nodes that write the outputs, and what quantizes their inputs

    def float_node_order(self) -> list[str]:
        """Nodes to keep in float, in order: each sensitive node, then the nodes
        that quantize its inputs (their producer and other consumers)."""
        order: list[str] = []
        for loss in self.losses:
            for name in loss.group:
                if name not in order:
                    order.append(name)
        return order

    def reason(self, node: str) -> str:
        for loss in self.losses:
            if loss.node == node:
                return loss.why()
        for loss in self.losses:
            if node in loss.group:
                return f"quantizes an input of {loss.node}: {loss.why()}"
        if node in self.output_nodes:
            return f"{node} writes a model output or quantizes its input: int8 there bounds the output's accuracy"
        return "sensitive node"


def _feeds(samples: Samples) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return Reader()


def sqnr_db(reference: Any, values: Any) -> float:
    """SQNR of ``values`` against ``reference`` (lists of arrays) in dB,
    between -50 and SQNR_CAP_DB; a NaN/Inf where the reference is finite
    (a Log of a value int8 rounded to 0) is the floor."""
    ref = np.concatenate([np.asarray(a, np.float64).ravel() for a in reference])
    got = np.concatenate([np.asarray(a, np.float64).ravel() for a in values])
    if ref.shape != got.shape:
        return math.nan
    finite = np.isfinite(ref)
    if np.any(~np.isfinite(got[finite])):
        return -50.0
    ref, got = ref[finite], got[finite]
    signal, noise = float(np.sum(ref * ref)), float(np.sum((ref - got) ** 2))
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -50.0
    return max(-50.0, min(SQNR_CAP_DB, 10 * math.log10(signal / noise)))


def _sqnr(err: dict[str, float]) -> float | None:
    value = err.get("xmodel_err")
    if value is None or not math.isfinite(value):
        return None if value is None or math.isnan(value) else SQNR_CAP_DB
    return max(-50.0, min(SQNR_CAP_DB, float(value)))


def rank_nodes(prepared: Path, quantized: Path, samples: Samples, work: Path) -> Ranking:
    """Nodes of ``prepared`` (the float graph ``quantized`` was made from),
    worst first, by the noise they add in ``quantized``."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg

    work.mkdir(parents=True, exist_ok=True)
    float_aug, qdq_aug = work / "float_aug.onnx", work / "qdq_aug.onnx"
    dbg.modify_model_output_intermediate_tensors(str(prepared), str(float_aug))
    dbg.modify_model_output_intermediate_tensors(str(quantized), str(qdq_aug))
    float_acts = dbg.collect_activations(str(float_aug), _feeds(samples))
    qdq_acts = dbg.collect_activations(str(qdq_aug), _feeds(samples))
    matching = dbg.create_activation_matching(qdq_acts, float_acts)
    errors = dbg.compute_activation_error(matching, err_func=sqnr_db)
    graph = onnx.load(str(prepared)).graph
    measured = {name: v for name, err in errors.items() if (v := _sqnr(err)) is not None}
    for name in set(float_acts) & set(qdq_acts) - set(measured):  # tensors left in float (outputs among them)
        value = sqnr_db(float_acts[name], qdq_acts[name])
        if not math.isnan(value):
            measured[name] = value
    known: dict[str, float] = {}
    inits = {i.name for i in graph.initializer}
    for vi in graph.input:
        known[vi.name] = measured.get(vi.name, SQNR_CAP_DB)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    losses = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        ins = [known[i] for i in node.input if i and i not in inits and i in known]
        sqnr_in = min(ins) if ins else SQNR_CAP_DB
        outs = []
        for out in node.output:
            known[out] = measured.get(out, sqnr_in)
            outs.append(known[out])
        sqnr_out = min(outs) if outs else sqnr_in
        added = 10 ** (-sqnr_out / 10) - 10 ** (-sqnr_in / 10)
        if added < MIN_NOISE:
            continue
        group = _upstream(node, producer, consumers, inits)
        losses.append(NodeLoss(node.name, node.op_type, round(sqnr_in, 2), round(sqnr_out, 2),
                               float(added), group))
    losses.sort(key=lambda loss: -loss.added_noise)
    # An int8 output (a softmax in 1/255 steps) bounds the SQNR whatever
    # happens upstream, and a squashing output hides the noise it adds.
    outputs = [name for o in graph.output if o.name in producer
               for name in _upstream(producer[o.name], producer, consumers, inits, depth=1)]
    return Ranking(losses, list(dict.fromkeys(outputs)))


def _upstream(node: Any, producer: dict[str, Any], consumers: dict[str, list[Any]], inits: set[str],
              depth: int = UPSTREAM_DEPTH) -> list[str]:
    """``node``, then breadth first the nodes that quantize the tensors it
    reads (their producer and other consumers), up to UPSTREAM_DEPTH levels:
    an int8 error that a node amplifies (a Log of a quantized power spectrum)
    is made upstream of it."""
    group, level = [node.name], [node]
    for _ in range(depth):
        following = []
        for current in level:
            for name in current.input:
                if not name or name in inits:
                    continue
                for feeder in ([producer[name]] if name in producer else []) + consumers.get(name, []):
                    if feeder.name not in group:
                        group.append(feeder.name)
                        following.append(feeder)
        level = following
    return group
