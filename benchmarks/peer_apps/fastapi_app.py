"""Naive FastAPI peer: V2-style JSON body -> np.asarray -> onnxruntime -> JSON.

Runs inside build/peers/fastapi-venv under uvicorn (1 worker), never imports
edged. PEER_MODELS_DIR holds one folder per model with a model.onnx in it;
each is served at /v2/models/<folder>/infer with 1 intra-op thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import Body, FastAPI, HTTPException

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}
DATATYPES = {np.dtype(v).name: k for k, v in DTYPES.items()}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


SESSIONS = {d.name: _session(d / "model.onnx") for d in sorted(Path(os.environ["PEER_MODELS_DIR"]).iterdir())
            if (d / "model.onnx").is_file()}
app = FastAPI()


@app.get("/v2/health/ready")
def ready() -> dict:
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
def infer(name: str, body: dict = Body(...)) -> dict:
    session = SESSIONS.get(name)
    if session is None:
        raise HTTPException(404, f"no model {name!r}")
    feed = {item["name"]: np.asarray(item["data"], dtype=DTYPES[item["datatype"]]).reshape(item["shape"])
            for item in body["inputs"]}
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feed)
    return {"model_name": name, "outputs": [
        {"name": n, "shape": list(r.shape), "datatype": DATATYPES[r.dtype.name], "data": r.ravel().tolist()}
        for n, r in zip(names, results)]}
