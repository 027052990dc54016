"""Train a small PyTorch CNN on sklearn's digits (no download) and save it as a
torch.export archive, with NCHW calibration/held-out data, for
`edged convert digits_cnn.pt2 --profile rpi4` (litert-torch, int8 TFLite).

    python scripts/build_torch_demo.py --out build/demo-torch
    -> digits_cnn.pt2, digits_cnn.onnx (the same CNN for ONNX sources),
       digits_calib.npz (x), digits_test.npz (x, y)

Needs the convert-torch extra (torch, litert-torch) and scikit-learn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/demo-torch"))
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    out: Path = args.out
    if (out / "digits_cnn.pt2").exists() and (out / "digits_cnn.onnx").exists():
        print(f"torch demo up to date in {out}")
        return
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW, 0..1
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(args.epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            batch = order[i:i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    program = torch.export.export(model, (torch.from_numpy(x_test[:1]),))  # batch 1, static shapes
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".digits_cnn.pt2"
    torch.export.save(program, str(tmp))
    np.savez(out / "digits_calib.npz", x=x_train[:200])
    np.savez(out / "digits_test.npz", x=x_test, y=y_test)
    # The same CNN as ONNX (dynamic batch), a source for every target: ONNX, OpenVINO
    # and TFLite (through onnx2torch + litert-torch).
    tmp_onnx = out / ".digits_cnn.onnx"
    torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), str(tmp_onnx), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    tmp_onnx.replace(out / "digits_cnn.onnx")
    tmp.replace(out / "digits_cnn.pt2")
    print(f"wrote {out}/digits_cnn.pt2 and digits_cnn.onnx (held-out accuracy {accuracy:.3f}), "
          "digits_calib.npz, digits_test.npz")


if __name__ == "__main__":
    main()
