#!/usr/bin/env python3
"""Build the demo: a digits classifier and three bundles (ONNX int8 QDQ,
TFLite int8, OpenVINO) from it. No downloads: sklearn's bundled digits.

    python scripts/build_demo.py --out build/demo-bundles

writes

    <out>/digits-onnx/       ONNX int8 QDQ bundle
    <out>/digits-tflite/     full-integer int8 .tflite bundle
    <out>/digits-openvino/   OpenVINO IR bundle (int8 via nncf; --openvino-precision fp16 for fp16)
    <data>/digits_fp32.onnx  the fp32 source model (input [-1,1,8,8] float32 0..1, output logits [-1,10])
    <data>/digits_test.npz   held-out test set: x float32 [N,1,8,8], y int64

with <data> = <out>/../demo-data unless --data is given. Nothing is rebuilt
when every output exists and is newer than this script and the converters;
--force rebuilds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUNDLES = ("digits-onnx", "digits-tflite", "digits-openvino")
LABELS = [str(i) for i in range(10)]
SEED = 0


def train() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=SEED)
    clf.fit(x_train.reshape(len(x_train), -1), y_train)
    return {
        "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
        "w1": clf.coefs_[0].astype(np.float32), "b1": clf.intercepts_[0].astype(np.float32),
        "w2": clf.coefs_[1].astype(np.float32), "b2": clf.intercepts_[1].astype(np.float32),
    }


def write_onnx(path: Path, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> None:
    """input [-1,1,8,8] -> Flatten -> Gemm -> Relu -> Gemm -> logits [-1,10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
            helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden"], name="fc1"),
            helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="relu1"),
            helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["logits"], name="fc2"),
        ],
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edged-build-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def up_to_date(out: Path, data: Path) -> bool:
    inputs = [Path(__file__).resolve(), *sorted((REPO / "converters").glob("*.py"))]
    newest_input = max(p.stat().st_mtime for p in inputs if p.exists())
    outputs = [out / b / "manifest.json" for b in BUNDLES] + [data / "digits_fp32.onnx", data / "digits_test.npz"]
    return all(p.exists() and p.stat().st_mtime > newest_input for p in outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "demo-bundles", help="bundle directory")
    parser.add_argument("--data", type=Path, default=None, help="test set + fp32 model (default <out>/../demo-data)")
    parser.add_argument("--openvino-precision", choices=("int8", "fp16"), default="int8")
    parser.add_argument("--force", action="store_true", help="rebuild even when outputs are up to date")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    data = (args.data or out.parent / "demo-data").resolve()
    if not args.force and up_to_date(out, data):
        print(f"demo bundles up to date in {out} (use --force to rebuild)")
        return 0

    from converters.base import BundleInfo
    from converters.onnx_qdq import OnnxQDQConverter
    from converters.openvino_ir import OpenVinoConverter
    from converters.tflite_int8 import TFLiteInt8Converter

    start = time.perf_counter()
    t = train()
    source = data / "digits_fp32.onnx"
    write_onnx(source, t["w1"], t["b1"], t["w2"], t["b2"])
    data.mkdir(parents=True, exist_ok=True)
    tmp = data / ".digits_test.npz"
    np.savez(tmp, x=t["x_test"], y=t["y_test"])
    tmp.replace(data / "digits_test.npz")
    calibration = t["x_train"][:300]
    print(f"trained digits MLP 64->64->10 on {len(t['x_train'])} images in {time.perf_counter() - start:.1f}s")

    # Each bundle records the hw-profile (`edged profiles list`) whose default output it is.
    targets = [
        ("digits-onnx", "generic-x86", OnnxQDQConverter(precision="int8")),
        ("digits-tflite", "generic-arm64", TFLiteInt8Converter()),
        ("digits-openvino", "intel-x86", OpenVinoConverter(precision=args.openvino_precision)),
    ]
    for name, profile, converter in targets:
        began = time.perf_counter()
        info = BundleInfo(
            name=name, version="1.0.0", labels=LABELS, validation_x=t["x_test"], validation_y=t["y_test"], hw_profile=profile,
            extra_provenance={"dataset": "sklearn load_digits, 25% held out (random_state=0)"},
        )
        bundle = converter.convert(source, None, calibration, dest=out / name, info=info)
        v = bundle.manifest.validation
        print(
            f"{name:<16} {bundle.manifest.provenance.get('precision', ''):<5} "
            f"acc fp32 {v['accuracy_fp32']:.4f}  converted {v['accuracy_converted']:.4f}  "
            f"top-1 agreement {v['top1_agreement']:.4f}  ({time.perf_counter() - began:.1f}s)"
        )
    print(f"bundles in {out}, test set and fp32 model in {data} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
