"""Train a small Keras CNN on sklearn's digits (no download) and save it, with
NHWC calibration/held-out data, for `edged convert` to TFLite int8.

    python scripts/build_keras_demo.py --out build/demo-keras
    -> digits_cnn.keras, digits_calib.npz (x), digits_test.npz (x, y)

Needs the convert-tf extra (TensorFlow) and scikit-learn.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/demo-keras"))
    parser.add_argument("--epochs", type=int, default=80)
    args = parser.parse_args()
    out: Path = args.out
    if (out / "digits_cnn.keras").exists():
        print(f"keras demo up to date in {out}")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    tf.keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC, 0..1
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = tf.keras.Sequential([
        tf.keras.Input(shape=(8, 8, 1), name="image"),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2),
        tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10),
    ])
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".digits_cnn.keras"
    model.save(tmp)
    np.savez(out / "digits_calib.npz", x=x_train[:200])
    np.savez(out / "digits_test.npz", x=x_test, y=y_test)
    tmp.replace(out / "digits_cnn.keras")
    print(f"wrote {out}/digits_cnn.keras (held-out accuracy {accuracy:.3f}), digits_calib.npz, digits_test.npz")


if __name__ == "__main__":
    main()
