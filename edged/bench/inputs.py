"""Benchmark inputs: a user's .npz/.npy, a bundle's samples.npz, or random tensors
made from tensor specs (a manifest's or a daemon's /v2/models/M metadata)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.bench.stats import BenchError
from edged.errors import EdgedError
from edged.tensors import numpy_dtype


@dataclass(frozen=True)
class InputSpec:
    """What a benchmark needs of one input: its name, numpy dtype and shape (-1 = any)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


def specs_from_metadata(model: str, meta: dict[str, Any]) -> list[InputSpec]:
    """The inputs of a daemon's ``/v2/models/M`` answer."""
    specs = []
    for item in meta.get("inputs") or []:
        try:
            specs.append(InputSpec(str(item["name"]), numpy_dtype(item["datatype"]).name,
                                   tuple(int(d) for d in item["shape"])))
        except (KeyError, TypeError, ValueError, EdgedError) as exc:
            raise BenchError(f"model {model}: its metadata has an input the benchmark cannot read ({exc}); "
                             "give --input FILE.npz") from None
    if not specs:
        raise BenchError(f"model {model}: its metadata lists no inputs; give --input FILE.npz")
    return specs


def load_input_file(path: Path, specs: list[InputSpec] | None) -> dict[str, np.ndarray]:
    """``.npz`` keyed by input name (``input:NAME`` keys of a samples.npz work too;
    ``output:`` keys are skipped) or ``.npy`` for a single-input model. Without
    ``specs`` (no metadata to check against) every tensor is taken as it is, and a
    .npy's is keyed ``""`` (the daemon's single input)."""
    if not path.is_file():
        raise BenchError(f"--input {path}: no such file")
    try:
        if path.suffix == ".npy" and specs is None:
            return {"": np.load(path, allow_pickle=False)}
        if path.suffix == ".npy" and specs is not None:
            if len(specs) != 1:
                raise BenchError(f"--input {path}: a .npy holds one tensor but the model has {len(specs)} inputs; "
                                 "use an .npz keyed by input name")
            return {specs[0].name: np.load(path, allow_pickle=False)}
        if path.suffix != ".npz":
            raise BenchError(f"--input {path}: expected .npz (keyed by input name) or .npy")
        with np.load(path, allow_pickle=False) as data:
            arrays = {k.removeprefix("input:"): data[k] for k in data.files if not k.startswith("output:")}
    except (OSError, ValueError) as exc:
        raise BenchError(f"--input {path}: cannot read it: {exc}") from None
    if specs is None:
        if not arrays:
            raise BenchError(f"--input {path}: it holds no input tensors")
        return arrays
    if len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
        arrays = {specs[0].name: next(iter(arrays.values()))}  # one tensor under another key (x)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise BenchError(f"--input {path}: no tensor for input(s) {', '.join(missing)} "
                         f"(it has {', '.join(arrays) or 'none'})")
    return {s.name: arrays[s.name] for s in specs}


def random_inputs(specs: list[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors of each spec's dtype; a dynamic first dim becomes ``batch``. Any
    other dynamic dim has no size to guess, so it asks for --input."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = list(spec.shape)
        if shape and shape[0] == -1:
            shape[0] = batch
        if -1 in shape:
            raise BenchError(f"input {spec.describe()} has dynamic dims besides the batch and no sample fixes them; "
                             "give --input FILE.npz with a real input")
        arrays[spec.name] = _random(rng, np.dtype(spec.dtype), tuple(shape))
    return arrays


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.itemsize == 1:  # int8/uint8: quantized data, the whole range
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.integers(0, 10, shape, dtype=dtype)  # wider ints are often ids or lengths: keep them small


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """None when every input's first dim is dynamic (any batch runs); else the one
    batch size the model takes."""
    if specs and all(s.shape and s.shape[0] == -1 for s in specs):
        return None
    for spec in specs:
        if spec.shape and spec.shape[0] > 0:
            return spec.shape[0]
    return 1


def check_batches(model: str, specs: list[InputSpec], batches: list[int]) -> None:
    """A batch size other than the model's fixed one is a clear error."""
    fixed = fixed_batch(specs)
    if fixed is None:
        return
    wrong = [b for b in batches if b != fixed]
    if wrong:
        shown = ", ".join(s.describe() for s in specs)
        raise BenchError(f"--batch {','.join(map(str, wrong))}: model {model} has a fixed batch dim ({shown}); "
                         f"only --batch {fixed} applies")


def with_batch(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` rows of each array, repeating rows when it has fewer."""
    out: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] == 0:
            raise BenchError(f"input {name}: a sample of shape {list(array.shape)} has no rows to build a batch from")
        rows = np.arange(batch) % array.shape[0]
        out[name] = np.ascontiguousarray(array[rows])
    return out
