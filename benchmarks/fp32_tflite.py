"""Write an fp32 .tflite of a .pt2 program or an ONNX model (through onnx2torch),
with litert-torch and no quantization: the same-runtime fp32 reference for the
conversion benchmark. Runs in build/torch-venv.

    build/torch-venv/bin/python -m benchmarks.fp32_tflite SRC OUT.tflite [--input-shape 1,3,48,192]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--input-shape", default="")
    args = parser.parse_args()
    import litert_torch
    import torch

    if args.source.suffix == ".onnx":
        from converters.onnx_torch import onnx_program

        shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else None
        if shape is None:
            import onnx

            dims = onnx.load(str(args.source)).graph.input[0].type.tensor_type.shape.dim
            shape = (1, *(int(d.dim_value) for d in dims[1:]))
        program = onnx_program(args.source, shape)
    else:
        program = torch.export.load(str(args.source))
    litert_torch.convert(program.module(), tuple(program.example_inputs[0])).export(str(args.out))


if __name__ == "__main__":
    main()
