"""A loaded bundle: runtime + manifest, with input checks and int8 conversion."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edged.bundle import Bundle
from edged.errors import BundleError, InvalidInput
from edged.runtimes import Runtime, RuntimeOptions, create_runtime
from edged.tensors import TensorSpec

log = logging.getLogger(__name__)

KNOWN_SHAPES = 16  # per input: shapes remembered as valid (see LoadedModel.infer)


def _shapes_compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def check_against_manifest(kind: str, declared: list[TensorSpec], actual: list[TensorSpec]) -> None:
    """Raise BundleError when the model's own tensors disagree with the manifest."""
    by_name = {t.name: t for t in actual}
    if set(by_name) != {t.name for t in declared}:
        raise BundleError(
            f"manifest {kind} {sorted(t.name for t in declared)} do not match the model's {sorted(by_name)}"
        )
    for spec in declared:
        model = by_name[spec.name]
        if model.dtype != spec.dtype:
            raise BundleError(f"{kind} {spec.name}: manifest dtype {spec.dtype}, model has {model.dtype}")
        if not _shapes_compatible(model.shape, spec.shape):
            raise BundleError(
                f"{kind} {spec.name}: manifest shape {list(spec.shape)} (layout {spec.layout or '?'}) "
                f"does not fit the model's {list(model.shape)}"
            )
        if spec.layout and len(spec.layout) != len(spec.shape):
            raise BundleError(f"{kind} {spec.name}: layout {spec.layout} does not have rank {len(spec.shape)}")
        if (model.quantization is None) != (spec.quantization is None):
            raise BundleError(
                f"{kind} {spec.name}: model quantization {model.quantization} but manifest says {spec.quantization}"
            )
        if model.quantization and spec.quantization:
            mq, sq = model.quantization, spec.quantization
            if mq.zero_point != sq.zero_point or not np.isclose(mq.scale, sq.scale, rtol=1e-5):
                raise BundleError(f"{kind} {spec.name}: model quantization {mq} but manifest says {sq}")


@dataclass
class LoadedModel:
    """A bundle loaded into a runtime, ready to infer."""

    bundle: Bundle
    runtime: Runtime
    load_seconds: float = 0.0
    warm_latency_s: float | None = None  # the last warm-up run (samples.npz batch), None without samples
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Worked out once: every request checks them.
        self._batch_one = bool(self.inputs) and all(s.shape[:1] == (1,) for s in self.inputs.values())
        self._accepted = {n: frozenset(np.dtype(d) for d in s.accepted_dtypes()) for n, s in self.inputs.items()}
        self._quantized = any(s.quantization for s in self.inputs.values())
        self._native = {n: np.dtype(s.dtype) for n, s in self.inputs.items()}  # compared per request: dtype objects
        # Float in, float out: nothing to quantize or dequantize on the way.
        self._plain = not self._quantized and not any(s.quantization for s in self.outputs.values())
        # Per input: the dtypes it takes and the shapes known to pass validate() and run in
        # one call (the declared one when fully static, then each one seen, up to
        # KNOWN_SHAPES): a request that fits is not checked step by step again.
        self._known = {n: (self._accepted[n], {s.shape} if -1 not in s.shape else set())
                       for n, s in self.inputs.items()}
        # The runtime's outputs come out in the manifest's order: its dict is the answer as is.
        runtime_outputs = [t.name for t in getattr(self.runtime, "outputs", [])]
        self._raw_in_order = runtime_outputs == list(self.outputs)

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @classmethod
    def load(cls, bundle: Bundle, options: RuntimeOptions, warmup: int = 3) -> "LoadedModel":
        start = time.perf_counter()
        runtime = create_runtime(bundle.manifest.runtime)
        runtime.load(str(bundle.model_path), options)
        try:
            check_against_manifest("inputs", bundle.manifest.inputs, runtime.inputs)
            check_against_manifest("outputs", bundle.manifest.outputs, runtime.outputs)
            model = cls(
                bundle=bundle,
                runtime=runtime,
                inputs={t.name: t for t in bundle.manifest.inputs},
                outputs={t.name: t for t in bundle.manifest.outputs},
            )
            model.warm_up(warmup)
        except Exception:
            runtime.unload()
            raise
        model.load_seconds = time.perf_counter() - start
        return model

    def warm_up(self, runs: int) -> None:
        """Run the bundle's sample inputs a few times so first requests are fast."""
        samples, _ = self.bundle.load_samples()
        if not samples or runs <= 0:
            return
        for _ in range(runs):
            start = time.perf_counter()
            self.infer(samples)
            self.warm_latency_s = time.perf_counter() - start

    def self_test(self) -> float:
        """Run samples.npz and return the worst error relative to the tolerance
        (<= 1.0 passes). Raises BundleError when the bundle has no samples."""
        inputs, expected = self.bundle.load_samples()
        if not inputs or not expected:
            raise BundleError(f"{self.name}: bundle has no samples to self-test with")
        got = self.infer(inputs)
        tol = self.bundle.manifest.tolerance
        atol, rtol = float(tol.get("atol", 1e-3)), float(tol.get("rtol", 1e-3))
        peak_fraction = float(tol.get("peak_fraction", 0.0))  # of each output's largest |value|
        worst = 0.0
        for name, want in expected.items():
            if name not in got:
                raise BundleError(f"{self.name}: self-test output {name} missing")
            reference = want.astype(np.float64)
            diff = np.abs(got[name].astype(np.float64) - reference)
            peak = float(np.max(np.abs(reference), initial=0.0))
            allowed = atol + peak_fraction * peak + rtol * np.abs(reference)
            worst = max(worst, float(np.max(diff / allowed)))
        return worst

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """Check names, dtypes and shapes before anything reaches the runtime."""
        if inputs.keys() == self.inputs.keys():
            for name, array in inputs.items():
                spec = self.inputs[name]
                shape = array.shape
                if array.dtype in self._accepted[name] and len(shape) == len(spec.shape) and all(
                        want == -1 or want == got or (i == 0 and self._batch_one and got != 0)
                        for i, (want, got) in enumerate(zip(spec.shape, shape))):
                    continue
                break
            else:
                return
        unknown = [n for n in inputs if n not in self.inputs]
        if unknown:
            raise InvalidInput(
                f"unknown input tensor(s) {', '.join(unknown)}; model {self.name} expects {', '.join(self.inputs)}"
            )
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise InvalidInput(f"missing input tensor(s) {', '.join(missing)} for model {self.name}")
        for name, array in inputs.items():
            spec = self.inputs[name]
            if array.dtype.name not in spec.accepted_dtypes():
                raise InvalidInput(
                    f"input {name}: expected dtype {' or '.join(spec.accepted_dtypes())}, got {array.dtype.name}"
                )
            shape = tuple(array.shape)
            if self.batch_one and shape[:1] != (0,) and len(shape) == len(spec.shape):
                shape = (1, *shape[1:])  # a batch-1 model takes any batch, one sample at a time
            if not spec.matches_shape(shape):
                raise InvalidInput(
                    f"input {name}: expected shape {list(spec.shape)} (-1 = any), got {list(array.shape)}"
                )

    @property
    def batch_one(self) -> bool:
        """The model's inputs have a fixed batch of 1 (e.g. a static-shape export)."""
        return self._batch_one

    def dynamic_batch_problem(self) -> str | None:
        """Why requests cannot be merged along dim 0 (an input or output whose first
        dimension is not dynamic), or None when they can."""
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs.values():
                if spec.shape[:1] != (-1,):
                    return f"{kind} {spec.name} has shape {list(spec.shape)}"
        return None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, quantize float inputs of int8 tensors, run, and dequantize
        outputs unless every quantized input came in its native dtype. A batch-1
        model runs a larger batch sample by sample and concatenates the results."""
        known = self._known
        if len(inputs) == len(known):
            for name, array in inputs.items():
                fits = known.get(name)
                if fits is None or array.dtype not in fits[0] or array.shape not in fits[1]:
                    break
            else:  # names, dtypes and shapes as a request that passed before: one call
                if self._plain and self._raw_in_order:  # _infer_one's first case, one call less
                    raw = self.runtime.infer(inputs)
                    return raw if len(raw) == len(self.outputs) else {name: raw[name] for name in self.outputs}
                return self._infer_one(inputs)
        self.validate(inputs)
        sizes = {a.shape[0] for a in inputs.values() if a.ndim} if self._batch_one else ()
        if sizes and max(sizes) > 1:
            if len(sizes) != 1:
                raise InvalidInput(f"inputs have different batch sizes: {sorted(sizes)}")
            parts = [self._infer_one({k: v[i:i + 1] for k, v in inputs.items()}) for i in range(sizes.pop())]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for name, array in inputs.items():
            shapes = known[name][1]
            if len(shapes) < KNOWN_SHAPES:
                shapes.add(array.shape)
        return self._infer_one(inputs)

    def _infer_one(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._plain:
            raw = self.runtime.infer(inputs)
            if self._raw_in_order and len(raw) == len(self.outputs):
                return raw
            return {name: raw[name] for name in self.outputs}
        native: dict[str, np.ndarray] = {}
        dequantize = False
        for name, array in inputs.items():
            spec = self.inputs[name]
            if spec.quantization is not None and array.dtype != self._native[name]:
                native[name] = spec.quantization.quantize(array, self._native[name])
                dequantize = True
            else:
                native[name] = array
        if not self._quantized:
            dequantize = True  # float model: quantized outputs (if any) become float
        raw = self.runtime.infer(native)
        outputs: dict[str, np.ndarray] = {}
        for name, spec in self.outputs.items():
            array = raw[name]
            if dequantize and spec.quantization is not None:
                array = spec.quantization.dequantize(array)
            outputs[name] = array
        return outputs

    def unload(self) -> None:
        self.runtime.unload()
