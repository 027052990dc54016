"""Section "peers": the same ONNX files served by edged, MLServer (a custom MLModel
around onnxruntime) and a naive FastAPI + uvicorn app, timed with one client in
interleaved rounds.

Each peer lives in its own venv under build/peers (``make install-peers``); a
peer whose venv is missing, or that does not start, is skipped with a note.
Every server gets 1 process, 1 onnxruntime intra-op thread, 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from benchmarks.common import measure
from benchmarks.peer_apps.launch import STARTERS, Server
from tests.helpers import DEMO_BUNDLES, REPO

SERVERS = ("edged", "mlserver", "fastapi")
LABELS = {"edged": "edged", "mlserver": "MLServer", "fastapi": "FastAPI"}
DIGITS, CNN = "digits-onnx", "cnn224-onnx"
PROTOCOLS = ("binary", "json")
CLIENTS = (1, 8)
ROUNDS = 3  # EDGED_BENCH_PEERS_ROUNDS overrides: more rounds for a busy machine
SECONDS = {DIGITS: 2.0, CNN: 4.0}  # per cell and round
WARMUP = {DIGITS: 5, CNN: 2}  # calls per client thread before timing


def build_cnn(path: Path, seed: int = 0) -> None:
    """A 224x224 CNN with random weights: input [N,3,224,224] -> 4 strided 3x3 convs
    (16, 32, 64, 128 channels, ReLU) -> global average pool -> Gemm -> logits [N,1000]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, prev, channels = [], [], "input", 3
    for i, out in enumerate((16, 32, 64, 128)):
        w = (rng.standard_normal((out, channels, 3, 3)) * np.sqrt(2.0 / (9 * channels))).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"conv{i}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"])]
        prev, channels = f"relu{i}", out
    fc = (rng.standard_normal((channels, 1000)) / np.sqrt(channels)).astype(np.float32)
    weights += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"])]
    graph = helper.make_graph(nodes, "cnn224", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edged-bench-peers")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _reference(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def make_models(models_dir: Path) -> dict[str, np.ndarray]:
    """The digits-onnx demo bundle and the CNN as an edged bundle; returns one input per model."""
    from edged.bundle import Manifest, write_bundle
    from edged.tensors import TensorSpec

    shutil.copytree(DEMO_BUNDLES / DIGITS, models_dir / DIGITS)
    with np.load(DEMO_BUNDLES / DIGITS / "samples.npz") as data:
        digits = np.ascontiguousarray(data["input:input"][:1], dtype=np.float32)
    source = models_dir.parent / "cnn224.onnx"
    build_cnn(source)
    image = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    manifest = Manifest(name=CNN, version="1.0.0", runtime="onnx", model_file="model.onnx",
                        inputs=[TensorSpec("input", "float32", (-1, 3, 224, 224), "NCHW")],
                        outputs=[TensorSpec("logits", "float32", (-1, 1000), "NC")],
                        provenance={"source": "benchmarks/peers.py build_cnn, random weights (seed 0)"})
    write_bundle(models_dir / CNN, manifest, {"model.onnx": source}, {"input": image},
                 {"logits": _reference(source, image)})
    return {DIGITS: digits, CNN: image}


@dataclass
class Request:
    """One prepared request body; ``output`` reads the logits back from a response."""

    body: bytes
    headers: dict[str, str]
    output: Callable[[bytes, Mapping[str, str]], np.ndarray]


def _json_output(raw: bytes, _headers: Mapping[str, str]) -> np.ndarray:
    out = json.loads(raw)["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _binary_output(raw: bytes, headers: Mapping[str, str]) -> np.ndarray:
    length = int(headers.get("Inference-Header-Content-Length", len(raw)))
    out = json.loads(raw[:length])["outputs"][0]
    size = out.get("parameters", {}).get("binary_data_size")
    if size is None:
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    return np.frombuffer(raw[length:length + size], dtype=np.float32).reshape(out["shape"])


def make_request(x: np.ndarray, binary: bool) -> Request:
    """A V2 request for input ``x``: the binary-data extension, or JSON with a flat data list."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if not binary:
        body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        return Request(body, {"Content-Type": "application/json"}, _json_output)
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return Request(head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                        "Content-Type": "application/octet-stream"}, _binary_output)


class Client:
    """Keep-alive http.client connections, one per calling thread (like core's raw client)."""

    def __init__(self, port: int, path: str, request: Request) -> None:
        self.port, self.path, self.request = port, path, request
        self.errors: list[str] = []
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def send(self) -> tuple[bytes, Mapping[str, str]]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            with self._lock:
                self._conns.append(conn)
        conn.request("POST", self.path, self.request.body, self.request.headers)
        response = conn.getresponse()
        raw = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {raw[:200]!r}")
        return raw, response.headers  # case-insensitive

    def call(self) -> None:
        """``send`` for measure(): an error is counted, never raised (a dead worker thread would hang its barrier)."""
        try:
            self.send()
        except Exception as exc:  # noqa: BLE001 - any failure marks the cell as failed
            self._local.conn = None
            self.errors.append(str(exc) or type(exc).__name__)

    def close(self) -> None:
        for conn in self._conns:
            conn.close()



def _check(server: Server, model: str, request: Request, expected: np.ndarray) -> str | None:
    """None when ``server`` answers ``request`` with ``expected`` (the local onnxruntime result), else why not."""
    client = Client(server.port, f"/v2/models/{model}/infer", request)
    try:
        raw, headers = client.send()
        got = request.output(raw, headers)
    except Exception as exc:  # noqa: BLE001 - reported as the server's failure
        return f"{model}: {exc}"
    finally:
        client.close()
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return f"{model}: output differs from onnxruntime's (max abs diff {np.max(np.abs(got - expected)):.3g})"
    return None


def _time(server: Server, model: str, request: Request, clients: int) -> dict:
    client = Client(server.port, f"/v2/models/{model}/infer", request)
    try:
        result = measure(client.call, seconds=SECONDS[model], concurrency=clients, warmup=WARMUP[model])
    finally:
        client.close()
    if client.errors:
        result.update(errors=len(client.errors), error=client.errors[0])
    return result


def _summary(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if not r.get("errors")]
    if len(ok) < len(rounds):
        return {"failed": next(r["error"] for r in rounds if r.get("errors")), "rounds": rounds}
    return {"rps": round(statistics.median(r["rps"] for r in ok), 1),
            "p50_us": round(statistics.median(r["p50_us"] for r in ok), 1), "rounds": rounds}


def _row(model: str, protocol: str, clients: int, cells: dict[str, list[dict]]) -> dict:
    row = {"model": model, "protocol": protocol, "clients": clients,
           "peer_body": "json", "servers": {name: _summary(rounds) for name, rounds in cells.items()}, "ratios": {}}
    edged = row["servers"].get("edged", {})
    for peer in SERVERS[1:]:
        other = row["servers"].get(peer, {})
        if "rps" in edged and other.get("rps"):
            per_round = [e["rps"] / p["rps"] for e, p in zip(edged["rounds"], other["rounds"]) if p["rps"]]
            row["ratios"][peer] = {"median": round(edged["rps"] / other["rps"], 2),
                                   "min": round(min(per_round), 2), "max": round(max(per_round), 2)}
    return row


def _rounds() -> int:
    text = os.environ.get("EDGED_BENCH_PEERS_ROUNDS", "").strip()
    if not text:
        return ROUNDS
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"error: EDGED_BENCH_PEERS_ROUNDS must be a whole number of at least 1, not {text!r}")
    return int(text)


def run() -> dict:
    rounds = _rounds()
    if not (DEMO_BUNDLES / DIGITS / "manifest.json").exists():  # stdout stays the caller's (JSON) alone
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_demo.py"), "--out", str(DEMO_BUNDLES)],
                       check=True, stdout=sys.stderr)
    results: dict = {"rounds": [], "rows": [], "skipped": {}, "servers": {}, "models": {},
                     "settings": {"rounds": rounds, "seconds": SECONDS, "warmup_per_thread": WARMUP,
                                  "clients": list(CLIENTS)}}
    with tempfile.TemporaryDirectory(prefix="edged-peers-") as tmp:
        work = Path(tmp)
        models_dir = work / "models"
        models_dir.mkdir()
        inputs = make_models(models_dir)
        expected = {name: _reference(models_dir / name / "model.onnx", x) for name, x in inputs.items()}
        requests = {(m, p): make_request(x, p == "binary") for m, x in inputs.items() for p in PROTOCOLS}
        for m, x in inputs.items():
            results["models"][m] = {"input_shape": list(x.shape), "binary_body_bytes": len(requests[m, "binary"].body),
                                    "json_body_bytes": len(requests[m, "json"].body)}
        servers: dict[str, Server] = {}
        try:
            for name in SERVERS:
                try:
                    servers[name] = STARTERS[name](work, models_dir, list(inputs))
                except Exception as exc:  # noqa: BLE001 - a peer that cannot start is skipped with the reason
                    if name == "edged":
                        raise
                    results["skipped"][name] = str(exc)
            for name, server in list(servers.items()):
                results["servers"][name] = server.versions
                protocols = PROTOCOLS if name == "edged" else ("json",)
                problem = next(filter(None, (_check(server, m, requests[m, p], expected[m])
                                             for m in inputs for p in protocols)), None)
                if problem is not None:
                    if name == "edged":
                        raise RuntimeError(f"edged answered wrongly: {problem}")
                    results["skipped"][name] = f"wrong answer, not timed: {problem}"
                    servers.pop(name).stop()
            cells: dict[tuple[str, str, int], dict[str, list[dict]]] = {}
            for number in range(1, rounds + 1):
                print(f"peers: round {number}/{rounds}", file=sys.stderr, flush=True)
                for m in inputs:
                    for protocol in PROTOCOLS:
                        for clients in CLIENTS:
                            for name, server in servers.items():
                                request = requests[m, protocol if name == "edged" else "json"]
                                cell = cells.setdefault((m, protocol, clients), {}).setdefault(name, [])
                                cell.append(_time(server, m, request, clients))
                results["rounds"].append({"round": number, "loadavg": [round(v, 2) for v in os.getloadavg()],
                                          "ended": time.strftime("%H:%M:%S", time.gmtime())})
        finally:
            for server in servers.values():
                server.stop()
    results["rows"] = [_row(m, p, c, cell) for (m, p, c), cell in cells.items()]
    return results


def _versions_text(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items()) or "versions unknown"


def markdown(results: dict) -> str:
    shown = [s for s in SERVERS if s in results["servers"] and s not in results["skipped"]]
    peers = [s for s in shown if s != "edged"]
    models = results["models"]
    lines = [
        "## peers", "",
        "The same ONNX files served by edged (`edged serve`), by MLServer (a custom `MLModel` around onnxruntime, "
        "`parallel_workers` 0, access log off) and by a naive FastAPI app under uvicorn (JSON body -> `np.asarray` -> "
        "onnxruntime -> JSON, 1 worker); both peers run on uvicorn with httptools. Each server: one process, onnxruntime with 1 intra-op thread, 127.0.0.1. "
        "Every server's answer is first checked against onnxruntime run here. One client for all: keep-alive "
        "`http.client` connections, one per client thread, bodies prepared in advance.",
        "",
        f"Models: `{DIGITS}` (the demo bundle, input {models.get(DIGITS, {}).get('input_shape')}) and `{CNN}`, "
        f"a 224x224 CNN built by `benchmarks/peers.py` with **random weights** (4 strided 3x3 convs with 16 to 128 "
        "channels, global average pool, a 1000-way Gemm): it stands in for an image model's cost and body size, "
        "it classifies nothing. Request bodies: " + "; ".join(
            f"{m} binary {v['binary_body_bytes']:,} B, JSON {v['json_body_bytes']:,} B" for m, v in models.items()) + ".",
        "",
        "**binary** rows: edged gets the V2 binary-data extension (raw FP32 after the JSON header, binary output); "
        "MLServer's REST API has no binary-data extension (its gRPC raw contents are not used here) and the naive "
        "FastAPI app takes JSON only, so their figure in those rows is their JSON request. "
        "**json** rows: the same V2 JSON body (flat `data` list) for all three.",
        "",
        f"{results['settings']['rounds']} interleaved rounds; within each round every row times edged, then MLServer, "
        "then FastAPI, for " + ", ".join(f"{s:g} s ({m})" for m, s in results["settings"]["seconds"].items())
        + " each. The figures are the medians over rounds; the ratio is edged's req/s over the peer's, with the "
        "lowest and highest single-round ratio in brackets. Goal (issue 14): edged ≥ 2× each peer on every row.",
        "",
    ]
    header = ["model", "request", "clients"] + [f"{LABELS[s]} req/s" for s in shown] \
        + [f"{LABELS[s]} p50 ms" for s in shown] + [f"edged / {LABELS[p]}" for p in peers]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    met = total = 0
    for row in results["rows"]:
        cells = [row["model"], row["protocol"], str(row["clients"])]
        for name in shown:
            s = row["servers"].get(name, {})
            cells.append(f"{s['rps']:,.1f}" if "rps" in s else "failed")
        for name in shown:
            s = row["servers"].get(name, {})
            cells.append(f"{s['p50_us'] / 1000:.2f}" if "rps" in s else "—")
        for peer in peers:
            ratio = row["ratios"].get(peer)
            if ratio is None:
                cells.append("—")
                continue
            total += 1
            met += ratio["median"] >= 2.0
            cells.append(f"{ratio['median']:.2f}× ({ratio['min']:.2f}–{ratio['max']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- edged ≥ 2× the peer on {met} of {total} row-and-peer pairs." if total
              else "- No peer was timed: see the notes below."]
    failures = [f"{LABELS[n]} {r['model']} {r['protocol']} c{r['clients']}: {s['failed']}"
                for r in results["rows"] for n, s in r["servers"].items() if "failed" in s]
    lines += [f"- Failed cells (errors during timing): {'; '.join(failures)}"] if failures else []
    lines += ["- Load average (1, 5, 15 min) at the end of each round, this benchmark's own client and server "
              "included: " + "; ".join(f"round {r['round']}: {', '.join(f'{v:.2f}' for v in r['loadavg'])}"
                                       for r in results["rounds"])]
    lines += [f"- {LABELS[name]}: {_versions_text(v)}" for name, v in results["servers"].items()]
    lines += [f"- {LABELS[name]} skipped: {why}" for name, why in results["skipped"].items()]
    return "\n".join(lines + [""])
