"""Samples for ``edged bundle create``: inputs read from an .npz keyed by input
name, or generated to fit each input, and stacked into one call of the model.

An array of rank r (the input's rank) holds samples along dim 0 (sample i is
``a[i:i+1]``); an array of rank r+1 holds them along a new leading axis (sample
i is ``a[i]``, e.g. a recurrent ``state`` [N, 2, 1, 128] or an int64 scalar
``sr`` [N]). A 0-d array for a 0-d input is used for every sample.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edged.errors import EdgedError
from edged.tensors import TensorSpec

MAX_SAMPLES = 8
MAX_SAMPLE_BYTES = 4 << 20  # samples.npz inputs stay small: fewer samples for big inputs
DATA_KEYS = ("y", "labels")  # label keys a samples file may carry; ignored here


class WrapError(EdgedError):
    """The model, a samples file or an option cannot be used as given."""

    code = "invalid_input"


def quoted(items: object) -> str:
    return ", ".join(repr(n) for n in items)  # type: ignore[attr-defined]


def parse_input_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    """``name=1,3,48,320`` (repeatable); a bare ``1,3,48,320`` means the only input."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            raise WrapError(f"--input-shape {value!r}: expected NAME=comma-separated integers, e.g. x=1,3,48,320") from None
        if any(d <= 0 for d in shape):
            raise WrapError(f"--input-shape {value!r}: every dimension must be a positive integer")
        shapes[name.strip()] = shape
    return shapes


def _sample_shapes(inputs: list[TensorSpec], hints: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    if "" in hints:
        if len(inputs) != 1:
            raise WrapError(f"--input-shape {','.join(map(str, hints['']))}: the model has {len(inputs)} inputs; write NAME=dims")
        hints = {inputs[0].name: hints[""]}
    by_name = {s.name: s for s in inputs}
    for name, shape in hints.items():
        spec = by_name.get(name)
        if spec is None:
            raise WrapError(f"--input-shape {name}=...: the model has no input {name!r}; its inputs are {quoted(by_name)}")
        if len(shape) != len(spec.shape) or not spec.matches_shape(shape):
            raise WrapError(f"--input-shape {name}={','.join(map(str, shape))} does not fit the model's shape {list(spec.shape)} (-1 = dynamic)")
    return {s.name: hints.get(s.name, tuple(1 if d < 0 else d for d in s.shape)) for s in inputs}


def _generated(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, count: int) -> tuple[list[np.ndarray], str]:
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return [rng.random(shape).astype(dtype) for _ in range(count)], "uniform 0..1"
    if dtype.kind in "iu" and (spec.quantization is not None or dtype.itemsize == 1):
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        return [rng.integers(low, high, size=shape, endpoint=True, dtype=dtype) for _ in range(count)], f"uniform {low}..{high}"
    return [np.zeros(shape, dtype) for _ in range(count)], "zeros: pass --samples with real values"


def generate_samples(inputs: list[TensorSpec], hints: dict[str, tuple[int, ...]],
                     count: int = MAX_SAMPLES) -> tuple[list[dict[str, np.ndarray]], str]:
    """``count`` calls' worth of inputs that fit each input: floats uniform in
    0..1, 8-bit and quantized integers over their full range, other integers
    and booleans zeros (the note says so)."""
    shapes = _sample_shapes(inputs, hints)
    rng = np.random.default_rng(0)
    described: list[str] = []
    samples: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for spec in inputs:
        arrays, what = _generated(spec, shapes[spec.name], rng, count)
        for sample, array in zip(samples, arrays):
            sample[spec.name] = array
        described.append(f"{spec.name} {spec.dtype} {list(shapes[spec.name])} {what}")
    return samples, "generated (" + "; ".join(described) + ")"


def _cast(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    kind = array.dtype.kind
    if want.kind == "f":
        if kind != "f":
            raise WrapError(f"{where}: input {spec.name} is {want.name}; the array is {array.dtype.name}")
        return array.astype(want, copy=False)
    if want.kind in "iu":
        if kind == "f" and spec.quantization is not None:
            return array.astype(np.float32, copy=False)  # the daemon quantizes float input
        if kind not in "iu":
            raise WrapError(f"{where}: input {spec.name} is {want.name}; the array is {array.dtype.name}")
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise WrapError(f"{where}: input {spec.name} is {want.name}; values {array.min()}..{array.max()} do not fit")
        return array.astype(want, copy=False)
    if kind != want.kind:
        raise WrapError(f"{where}: input {spec.name} is {want.name}; the array is {array.dtype.name}")
    return array.astype(want, copy=False)


def _split(array: np.ndarray, spec: TensorSpec, where: str) -> list[np.ndarray] | None:
    """One array per sample (None: a 0-d value used for every sample)."""
    rank = len(spec.shape)
    if rank == 0 and array.ndim == 0:
        return None
    if array.ndim == rank:
        parts = [array[i:i + 1] for i in range(len(array))]
    elif array.ndim == rank + 1:
        parts = [np.asarray(array[i]) for i in range(len(array))]
    else:
        raise WrapError(
            f"{where}: input {spec.name} has shape {list(spec.shape)}; its array must have rank {rank} "
            f"(samples along dim 0) or {rank + 1} (samples along a new leading axis), got {list(array.shape)}"
        )
    if not parts:
        raise WrapError(f"{where}: the array for input {spec.name} holds no samples")
    if not spec.matches_shape(tuple(parts[0].shape)):
        hint = ""
        if array.ndim == rank and spec.shape[:1] not in ((-1,), (1,)):
            hint = f"; its batch is not dim 0, so give shape [N, {', '.join(map(str, spec.shape))}]"
        raise WrapError(
            f"{where}: a sample of input {spec.name} has shape {list(parts[0].shape)}, the model takes "
            f"{list(spec.shape)} (-1 = any){hint}"
        )
    return parts


def load_samples(path: Path, inputs: list[TensorSpec]) -> tuple[list[dict[str, np.ndarray]], str]:
    """Per-call inputs from an .npz keyed by input name (``x`` for a single
    input); arrays of rank r hold samples along dim 0, rank r+1 along a new axis."""
    path = Path(path)
    if not path.is_file():
        raise WrapError(f"--samples {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):
            raise WrapError(f"--samples {path.name}: a single array (.npy); expected an .npz keyed by input name")
        with loaded as data:
            arrays = {k.removeprefix("input:"): data[k] for k in data.files if not k.startswith("output:")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise WrapError(f"--samples {path.name}: not a readable .npz ({exc})") from None
    where = f"--samples {path.name}"
    names = [s.name for s in inputs]
    if len(inputs) == 1 and "x" in arrays and names[0] not in arrays:
        arrays[names[0]] = arrays.pop("x")
    unknown = [k for k in arrays if k not in names and k not in DATA_KEYS]
    if unknown:
        single = " (a single-input model may use 'x')" if len(inputs) == 1 else ""
        raise WrapError(f"{where}: unknown key(s) {quoted(unknown)}; the model's inputs are {quoted(names)}{single}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise WrapError(f"{where}: no array for input(s) {quoted(missing)}; the model's inputs are {quoted(names)}")
    cast = {s.name: _cast(arrays[s.name], s, where) for s in inputs}
    split = {s.name: _split(cast[s.name], s, where) for s in inputs}
    counts = {n: len(p) for n, p in split.items() if p is not None}
    if len(set(counts.values())) > 1:
        raise WrapError(f"{where}: inputs hold different numbers of samples: "
                        + ", ".join(f"{n} {c}" for n, c in counts.items()))
    total = next(iter(counts.values()), 1)
    samples = [{n: cast[n] if p is None else p[i] for n, p in split.items()} for i in range(total)]
    return samples, f"{path.name} ({total} sample{'s' * (total != 1)})"


def stackable(sample: dict[str, np.ndarray], inputs: list[TensorSpec]) -> bool:
    """Samples stack along dim 0 when every input is batched there (all
    dynamic, or all a fixed 1, as LoadedModel runs batch-1 models) and a
    sample has batch 1."""
    return (
        all(len(s.shape) >= 1 for s in inputs)
        and (all(s.shape[0] == -1 for s in inputs) or all(s.shape[0] == 1 for s in inputs))
        and all(sample[s.name].shape[:1] == (1,) for s in inputs)
    )


def stack_samples(samples: list[dict[str, np.ndarray]], inputs: list[TensorSpec],
                  limit: int = MAX_SAMPLES) -> tuple[dict[str, np.ndarray], int]:
    """One call's inputs: up to ``limit`` samples (fewer for big inputs)
    stacked along dim 0 when they stack, else the first sample alone."""
    first = samples[0]
    if not stackable(first, inputs):
        return dict(first), 1
    per_sample = max(1, sum(a.nbytes for a in first.values()))
    count = max(1, min(len(samples), limit, MAX_SAMPLE_BYTES // per_sample))
    return {s.name: np.concatenate([x[s.name] for x in samples[:count]]) for s in inputs}, count
