"""Calibration and held-out data: files in, ``Samples`` out.

A ``Samples`` holds N samples; sample i is one call's inputs, each with the
model's full input shape (batch 1 where the model has a batch dim). Files are
``.npz`` keyed by input name (``x`` for a single-input model), ``.npy``, a
directory of images or ``module:function``. For an input of rank r, an array
of rank r carries the samples along its batch dim 0; an array of rank r+1
carries them along a new leading axis, each sample in the model's full shape
(a recurrent ``state`` [2, 1, 128], a 0-d ``sr``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from converters.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")
SINGLE_INPUT_KEYS = ("x", "input", "inputs")
LABEL_KEYS = ("y", "labels", "label")


@dataclass(frozen=True)
class ModelInput:
    """One input of the source model; -1 marks a dynamic dim."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def is_float(self) -> bool:
        return np.dtype(self.dtype).kind == "f"

    @property
    def dynamic_non_batch(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if i > 0 and d < 0]

    def describe(self) -> str:
        return f"{self.name!r} {list(self.shape)} {self.dtype}"


@dataclass
class Samples:
    """``arrays[name]`` is [N, *one call's shape of input name]."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.sample(i) for i in range(len(self)))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(a[i]) for name, a in self.arrays.items()}  # 0-d stays an array

    def head(self, n: int) -> "Samples":
        labels = None if self.labels is None else self.labels[:n]
        return Samples({k: v[:n] for k, v in self.arrays.items()}, labels)

    @property
    def batchable(self) -> bool:
        """Every input has a batch dim 0 of size 1, so samples stack along it."""
        return all(a.ndim >= 2 and a.shape[1] == 1 for a in self.arrays.values())

    def stacked(self) -> dict[str, np.ndarray]:
        """The samples as one batch along dim 0 (only when ``batchable``)."""
        return {k: v.reshape(len(v), *v.shape[2:]) for k, v in self.arrays.items()}

    def single(self) -> np.ndarray:
        """The only input as an [N, ...] float32 batch, for single-input converters."""
        from converters.errors import ConversionError

        if len(self.arrays) != 1 or not self.batchable:
            raise ConversionError(
                f"this converter takes one input with a batch dim; the model has {len(self.arrays)} inputs "
                f"({', '.join(self.arrays)})"
            )
        return np.asarray(next(iter(self.stacked().values())), dtype=np.float32)


def rename_feed(feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """A feed under another model's input names: by name where they all match,
    else by position (a converter may rename the inputs, e.g. TFLite's)."""
    if set(names) <= set(feed):
        return {n: feed[n] for n in names}
    return dict(zip(names, feed.values()))


def as_samples(data: Any, inputs: list[ModelInput]) -> Samples:
    """``Samples`` from a Samples, a dict keyed by input name, or a bare array
    for a single-input model (samples along dim 0)."""
    if isinstance(data, Samples):
        return data
    if isinstance(data, dict):
        return samples_from_arrays(data, inputs, "data")
    if len(inputs) != 1:
        raise BadInput(f"data for {len(inputs)} inputs must be keyed by input name, got one array")
    return samples_from_arrays({inputs[0].name: np.asarray(data)}, inputs, "data")


def samples_from_arrays(arrays: dict[str, np.ndarray], inputs: list[ModelInput], what: str,
                        labels: np.ndarray | None = None) -> Samples:
    """Check names, ranks, dtypes and counts; bring each array to [N, *call shape]."""
    names = [i.name for i in inputs]
    if len(inputs) == 1 and inputs[0].name not in arrays:
        key = next((k for k in SINGLE_INPUT_KEYS if k in arrays), None)
        if key is None and len(arrays) == 1:
            key = next(iter(arrays))
        if key is not None:
            arrays = {inputs[0].name: arrays[key]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadInput(f"{what}: no array for input(s) {', '.join(map(repr, missing))}; "
                       f"the file has {', '.join(map(repr, arrays)) or 'nothing'} "
                       f"(key arrays by input name{', or x' if len(inputs) == 1 else ''})")
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        a = np.asarray(arrays[spec.name])
        rank = len(spec.shape)
        if a.ndim == rank and rank >= 1:
            if any(want > 0 and got != want for want, got in zip(spec.shape[1:], a.shape[1:])):
                expected = ", ".join("?" if d < 0 else str(d) for d in spec.shape[1:])
                raise BadInput(f"{what}: shape mismatch for input {spec.name!r}: expected [N, {expected}] "
                               f"(N samples along the batch dim), got {list(a.shape)}")
            a = a[:, None]  # samples along the batch dim: each becomes a batch of 1
        elif a.ndim != rank + 1:
            raise BadInput(
                f"{what}: shape mismatch for input {spec.name!r}: the model wants {list(spec.shape)}; give "
                f"[N, {', '.join(map(str, spec.shape[1:]))}] or [N, {', '.join(map(str, spec.shape))}], "
                f"got {list(a.shape)}"
            )
        want_kind = np.dtype(spec.dtype).kind
        if (want_kind == "f") != (a.dtype.kind == "f") or (want_kind in "iu" and a.dtype.kind not in "iu"):
            raise BadInput(
                f"{what}: dtype mismatch for input {spec.name!r}: expected {spec.dtype}, got {a.dtype} "
                + ("(scale the data to floats the way the model was trained)" if want_kind == "f" else "")
            )
        call_shape = a.shape[1:]
        if any(want > 0 and got != want for want, got in zip(spec.shape, call_shape)):
            raise BadInput(
                f"{what}: shape mismatch for input {spec.name!r}: the model wants {list(spec.shape)} "
                f"(-1 = any) per call, got {list(call_shape)} per sample (array {list(a.shape)})"
            )
        if want_kind == "f" and not np.all(np.isfinite(a)):
            raise BadInput(f"{what}: input {spec.name!r} contains NaN or infinite values")
        out[spec.name] = np.ascontiguousarray(a, dtype=np.dtype(spec.dtype))
    counts = {name: len(a) for name, a in out.items()}
    if len(set(counts.values())) != 1:
        raise BadInput(f"{what}: inputs have different sample counts: {counts}")
    if not counts or not next(iter(counts.values())):
        raise BadInput(f"{what}: no samples")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
    return Samples(out, labels)


def load_samples(spec: str, inputs: list[ModelInput], what: str) -> Samples:
    """Data from a .npz/.npy file, an image directory or a ``module:function``."""
    arrays, labels = _read(spec, inputs, what)
    return samples_from_arrays(arrays, inputs, f"{what} {spec}", labels)


def _read(spec: str, inputs: list[ModelInput], what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    path = Path(spec)
    if path.is_dir():
        if len(inputs) != 1:
            raise BadInput(f"{what} {path}: an image directory feeds one input; the model has {len(inputs)}")
        return {inputs[0].name: load_images(path, inputs[0])}, None
    if path.is_file():
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                label_key = next((k for k in LABEL_KEYS if k in arrays), None)
                labels = arrays.pop(label_key) if label_key else None
                if not arrays:
                    raise BadInput(f"{what} {path}: the .npz holds no input arrays")
                return arrays, labels
            if path.suffix == ".npy":
                return {"x": np.load(path, allow_pickle=False)}, None
        except (OSError, ValueError) as exc:
            raise BadInput(f"{what} {path}: cannot read ({exc})") from None
        raise BadInput(f"{what} {path}: expected .npz, .npy, a directory of images or module:function")
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return _call(spec, what)
    raise BadInput(f"{what} {spec}: no such file or directory (and not a module:function)")


def _call(spec: str, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    module_name, func_name = spec.split(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        func: Callable[[], Any] = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise BadInput(f"{what} {spec}: cannot import ({exc})") from None
    try:
        result = func()
    except Exception as exc:
        raise BadInput(f"{what} {spec}: the function raised {type(exc).__name__}: {exc}") from None
    if isinstance(result, dict):
        arrays = {k: np.asarray(v) for k, v in result.items()}
        label_key = next((k for k in LABEL_KEYS if k in arrays), None)
        return arrays, arrays.pop(label_key) if label_key else None
    if isinstance(result, tuple) and len(result) == 2:
        return {"x": np.asarray(result[0])}, np.asarray(result[1])
    return {"x": np.asarray(result)}, None


def image_layout(model_input: ModelInput) -> tuple[str, int, int, int]:
    """(layout, channels, H, W) for a 4-D image input; NCHW when dim 1 is 1 or 3."""
    shape = model_input.shape
    if len(shape) != 4:
        raise BadInput(f"image calibration needs a 4-D model input, {model_input.name!r} is {list(shape)}")
    if shape[1] in (1, 3):
        layout, c, h, w = "NCHW", shape[1], shape[2], shape[3]
    elif shape[3] in (1, 3):
        layout, c, h, w = "NHWC", shape[3], shape[1], shape[2]
    else:
        raise BadInput(f"image calibration: cannot tell the channel dim of {list(shape)} (want 1 or 3 channels)")
    if h <= 0 or w <= 0:
        raise BadInput(f"image calibration needs a static H and W; the model input is {list(shape)}: "
                       f"pass --input-shape {model_input.name}=1,...")
    return layout, c, h, w


def load_images(directory: Path, model_input: ModelInput) -> np.ndarray:
    """Grayscale (1 channel) or RGB (3), resized to the model's H x W
    (bilinear), scaled to 0..1 float32, laid out as the model input."""
    if importlib.util.find_spec("PIL") is None:
        raise BadInput(
            f"calibration from an image directory ({directory}) needs Pillow: pip install 'edged[convert-images]'"
        )
    from PIL import Image

    layout, c, h, w = image_layout(model_input)
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise BadInput(f"{file}: cannot read image ({exc})") from None
        a = a.reshape(h, w, c)
        images.append(a.transpose(2, 0, 1) if layout == "NCHW" else a)
    return np.stack(images)


def random_samples(inputs: list[ModelInput], n: int) -> Samples:
    """Uniform 0..1 floats: the last resort without --calib, for one float input."""
    if len(inputs) != 1 or not inputs[0].is_float:
        raise BadInput("no --calib: random calibration works for one float input only; pass --calib FILE.npz "
                       "keyed by input name")
    spec = inputs[0]
    if spec.dynamic_non_batch:
        raise BadInput(f"no --calib and input {spec.describe()} has dynamic dims: pass --calib or "
                       f"--input-shape {spec.name}=1,...")
    rng = np.random.default_rng(0)
    shape = (n, 1, *spec.shape[1:]) if spec.shape else (n,)
    return Samples({spec.name: rng.random(shape, dtype=np.float32)})
