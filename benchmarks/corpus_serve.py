"""Served bundles against the fp32 source, over HTTP: the measurement shared by the
corpus benchmark (``benchmarks.corpus``) and its end-to-end test (tests/e2e/test_corpus.py).

``Fp32Model`` runs the source file directly (onnxruntime or the TFLite interpreter, through
``tests.corpus.runtime.Runner``); ``ServedModel`` sends the same feed to a daemon with the
KServe V2 binary protocol. Both take feeds keyed by the source's input names and answer
outputs keyed by the source's output names, so ``compare`` and ``state_loop`` do not care
which side renamed a tensor (a TFLite route may). Stateful models (``LOOPS``) are also run
as a loop: each call's state output is the next call's state input, over a sequence of
chunks of speech-like audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

Feed = dict[str, np.ndarray]


def _pairs(source_names: list[str], served_names: list[str]) -> list[tuple[str, str]]:
    """(source name, served name): by name where all match (a bundle may lack a source
    input that edged convert folded into it, e.g. silero's constant ``sr``), else by position."""
    if set(source_names) <= set(served_names):
        return [(n, n) for n in source_names]
    if set(served_names) < set(source_names):
        return [(n, n) for n in source_names if n in served_names]
    return list(zip(source_names, served_names))


class Fp32Model:
    """The source model file run directly, one sample per call."""

    def __init__(self, path: Path) -> None:
        from tests.corpus.runtime import Runner

        self.runner = Runner(path)
        self.input_names = [s.name for s in self.runner.inputs]
        self.output_names = [s.name for s in self.runner.outputs]

    def run(self, feed: Feed) -> Feed:
        return dict(zip(self.output_names, self.runner.run(feed)))


class ServedModel:
    """A bundle served by a daemon; ``run`` is one binary KServe V2 request."""

    def __init__(self, url: str, bundle_dir: Path, source: Fp32Model) -> None:
        from edged.bundle import open_bundle
        from edged.client import V2Client

        manifest = open_bundle(bundle_dir).manifest
        self.name = manifest.name
        self.client = V2Client(url, timeout=120.0)
        self.inputs = _pairs(source.input_names, [t.name for t in manifest.inputs])
        self.outputs = _pairs(source.output_names, [t.name for t in manifest.outputs])

    def run(self, feed: Feed) -> Feed:
        got = self.client.infer(self.name, {served: feed[src] for src, served in self.inputs})
        return {src: got[served] for src, served in self.outputs}


def load_feeds(npz: Path, model: Fp32Model) -> tuple[list[Feed], np.ndarray | None]:
    """One feed per sample of an ``.npz`` (keyed by input name, ``x`` for a single input;
    the converters' rank convention), and its ``y`` labels if it has them."""
    from tests.corpus.runtime import iter_samples

    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    labels = arrays.pop("y", arrays.pop("labels", None))
    if len(model.input_names) == 1 and model.input_names[0] not in arrays and "x" in arrays:
        arrays[model.input_names[0]] = arrays.pop("x")
    feeds = list(iter_samples(arrays, model.runner.inputs))
    return feeds, (None if labels is None else np.asarray(labels).reshape(-1))


def run_all(call: Callable[[Feed], Feed], feeds: list[Feed]) -> Feed:
    """Every feed through ``call``; each output stacked along a new sample axis."""
    outs = [call(feed) for feed in feeds]
    return {name: np.stack([o[name] for o in outs]) for name in outs[0]}


@dataclass
class Comparison:
    """Served outputs against fp32: metrics per output and the task's gate."""

    outputs: list[dict[str, Any]]
    verdicts: list[str]
    passed: bool
    collapsed: list[str]

    def text(self) -> str:
        if self.collapsed:
            return "; ".join(f"COLLAPSED {c}" for c in self.collapsed)
        return "; ".join(self.verdicts)


def compare(task_name: str, ref: Feed, got: Feed, labels: np.ndarray | None = None) -> Comparison:
    """``converters.metrics``' per-output metrics and the gate of ``task_name``."""
    from converters.metrics import TASKS, compare_output, judge

    task = TASKS[task_name]
    metrics = [compare_output(name, ref[name], got[name], classify=task.metric == "top1" and i == 0,
                              labels=labels) for i, name in enumerate(ref)]
    verdicts = judge(metrics, task)
    collapsed = [f"{m.name}: {m.collapse}" for m in metrics if m.collapse]
    return Comparison([m.to_dict() for m in metrics], [v.describe() for v in verdicts],
                      all(v.passed for v in verdicts) and not collapsed, collapsed)


@dataclass(frozen=True)
class StateLoop:
    """How a recurrent model is driven: audio chunks in, state outputs fed back."""

    chunk: int  # new samples per call
    context: int  # samples of the previous chunk prepended
    states: tuple[tuple[str, str], ...]  # (state input, the output that is its next value)
    prob_output: str  # the speech probability output
    sr: int = 16000


LOOPS: dict[str, StateLoop] = {
    "silero_vad": StateLoop(512, 64, (("state", "stateN"),), "output"),
    "silero_vad_v4": StateLoop(512, 0, (("h", "hn"), ("c", "cn")), "output"),
}


def speech_chunks(loop: StateLoop, seconds: float = 3.0, seed: int = 7) -> list[np.ndarray]:
    """Chunks of a speech-like clip with pauses (the corpus' audio generator), each with its context."""
    from tests.corpus import audio

    clip, _ = audio.clip_with_silences(np.random.default_rng(seed), seconds)
    chunks, ctx = [], np.zeros(loop.context, np.float32)
    for start in range(0, len(clip) - loop.chunk + 1, loop.chunk):
        new = clip[start:start + loop.chunk].astype(np.float32)
        chunks.append(np.concatenate([ctx, new])[None].astype(np.float32))
        ctx = new[len(new) - loop.context:] if loop.context else ctx
    return chunks


def state_loop(call: Callable[[Feed], Feed], loop: StateLoop, chunks: list[np.ndarray],
               state_shapes: dict[str, tuple[int, ...]]) -> Feed:
    """Run ``chunks`` in order, each call's state outputs feeding the next call;
    returns every output stacked over the steps."""
    state = {name: np.zeros(state_shapes[name], np.float32) for name, _ in loop.states}
    steps = []
    for chunk in chunks:
        out = call({"input": chunk, "sr": np.array(loop.sr, np.int64), **state})
        state = {name: np.asarray(out[nxt], np.float32) for name, nxt in loop.states}
        steps.append(out)
    return {name: np.stack([s[name] for s in steps]) for name in steps[0]}
