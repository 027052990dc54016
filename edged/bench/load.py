"""Load-testing a running daemon: a concurrency sweep where each level runs N
client threads back to back for a while (like Triton's perf_analyzer), over KServe V2
HTTP with binary or JSON bodies. MQTT workers live in ``edged.bench.mqtt``."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edged.bench.inputs import load_input_file, random_inputs, specs_from_metadata
from edged.bench.stats import BenchError, ProgressFn, latency_summary, rate

PROTOCOLS = ("http-binary", "http-json", "mqtt")
PROGRESS_EVERY_S = 0.1


@dataclass(frozen=True)
class LoadOptions:
    """Each level: ``warmup`` untimed requests per client, then requests back to back
    until ``duration_s`` passed or ``iterations`` requests were sent in all."""

    concurrency: tuple[int, ...] = (1, 4, 16)
    duration_s: float = 3.0
    iterations: int = 100_000
    warmup: int = 10
    timeout_s: float = 30.0


class Worker(Protocol):
    """One client: ``call`` sends one request and raises on any failure."""

    def call(self) -> None: ...

    def close(self) -> None: ...


def model_inputs(url: str, model: str, version: str | None, input_path: Path | None,
                 timeout_s: float = 30.0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The request tensors (``--input`` or random from ``/v2/models/M``) and the
    metadata. Unreachable daemon, 401 and unknown model raise BenchError."""
    from edged.client import ClientError, V2Client

    client = V2Client(url, timeout=timeout_s)
    path = f"/v2/models/{urllib.parse.quote(model, safe='')}" + (f"/versions/{version}" if version else "")
    try:
        meta = client.get_json(path)
    except ClientError as exc:
        raise BenchError(f"model {model} at {url}: {exc}") from None
    except ValueError:
        raise BenchError(f"{url}{path} did not answer with JSON: is it an edged daemon?") from None
    specs = specs_from_metadata(model, meta)
    arrays = load_input_file(input_path, specs) if input_path else random_inputs(specs, 1)
    return arrays, meta


class HttpTarget:
    """Where and how to send one model's inference requests; ``body`` is built once."""

    def __init__(self, url: str, model: str, version: str | None, arrays: dict[str, np.ndarray],
                 protocol: str, timeout_s: float = 30.0) -> None:
        from edged.client import V2Client

        parsed = check_url(url)
        client = V2Client(url)  # $EDGED_TOKEN and $EDGED_CA_FILE, as every client command
        self.https = parsed.scheme == "https"
        self.host = parsed.hostname
        self.port = parsed.port or (443 if self.https else 80)
        self.ssl_context = client.ssl_context
        self.timeout_s = timeout_s
        base = parsed.path.rstrip("/")
        self.path = f"{base}/v2/models/{urllib.parse.quote(model, safe='')}" + \
            (f"/versions/{version}" if version else "") + "/infer"
        self.headers = {"Authorization": f"Bearer {client.token}"} if client.token else {}
        self.body, content = encode_request(arrays, protocol)
        self.headers.update(content)

    def connect(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def worker(self) -> "HttpWorker":
        return HttpWorker(self)


def check_url(url: str) -> urllib.parse.SplitResult:
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port  # raises on a port that is not a number
    except ValueError:
        parsed = parsed._replace(netloc="")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BenchError(f"--url {url}: expected http://HOST:PORT or https://HOST:PORT")
    return parsed


def encode_request(arrays: dict[str, np.ndarray], protocol: str) -> tuple[bytes, dict[str, str]]:
    """A KServe V2 request body and its headers: binary tensor data or a JSON body."""
    from edged.tensors import v2_datatype
    from edged.v2 import HEADER_LENGTH

    tensors = []
    blobs = []
    for name, array in arrays.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": v2_datatype(array.dtype)}
        if protocol == "http-binary":
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    if protocol != "http-binary":
        return json.dumps({"inputs": tensors}).encode(), {"Content-Type": "application/json"}
    head = json.dumps({"inputs": tensors, "parameters": {"binary_data_output": True}}).encode()
    return b"".join([head, *blobs]), {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


class HttpWorker:
    """One keep-alive connection; reconnects after a failure or a ``Connection: close``."""

    def __init__(self, target: HttpTarget) -> None:
        self.target = target
        self.conn: http.client.HTTPConnection | None = None

    def call(self) -> None:
        if self.conn is None:
            self.conn = self.target.connect()
        try:
            self.conn.request("POST", self.target.path, self.target.body, self.target.headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {_error_text(data)}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", ""))[:200]
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")


def preflight(worker: Worker, where: str) -> None:
    """One request before the sweep: a 401 or a refused input stops here, as one line."""
    try:
        worker.call()
    except Exception as exc:
        worker.close()
        raise BenchError(f"{where}: the first request failed: {exc or type(exc).__name__}") from None


def run_levels(new_worker: Callable[[], Worker], options: LoadOptions,
               on_progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """One row per concurrency level."""
    return [run_level(new_worker, level, options, on_progress) for level in options.concurrency]


def run_level(new_worker: Callable[[], Worker], concurrency: int, options: LoadOptions,
              on_progress: ProgressFn | None = None) -> dict[str, Any]:
    label = f"{concurrency} client{'s' if concurrency > 1 else ''}"
    workers = [new_worker() for _ in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in workers]
    errors: list[list[str]] = [[] for _ in workers]
    stop = threading.Event()
    go = threading.Barrier(concurrency + 1)
    tickets = _Tickets(options.iterations)

    def loop(index: int) -> None:
        worker, mine, failed = workers[index], latencies[index], errors[index]
        for _ in range(options.warmup):
            try:
                worker.call()
            except Exception:  # counted in the timed part only
                pass
        go.wait()
        clock = time.perf_counter
        while not stop.is_set() and tickets.take():
            t0 = clock()
            try:
                worker.call()
            except Exception as exc:
                failed.append(str(exc) or type(exc).__name__)
                continue
            mine.append(clock() - t0)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True, name=f"edged-bench-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        go.wait()
        start = time.perf_counter()
        deadline = start + options.duration_s
        while (now := time.perf_counter()) < deadline and not tickets.exhausted():
            if on_progress is not None:
                on_progress(label, max((now - start) / options.duration_s, tickets.taken / options.iterations))
            time.sleep(min(PROGRESS_EVERY_S, max(deadline - now, 0.0)))
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        for worker in workers:
            worker.close()
    if on_progress is not None:
        on_progress(label, 1.0)
    done = [x for mine in latencies for x in mine]
    failures = [e for mine in errors for e in mine]
    return {"concurrency": concurrency, "requests": len(done), "errors": len(failures),
            "seconds": round(elapsed, 3), "req_per_s": rate(len(done), elapsed), **latency_summary(done),
            "first_error": failures[0] if failures else None}


class _Tickets:
    """At most ``limit`` requests in all, across the level's threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.taken >= self.limit:
                return False
            self.taken += 1
            return True

    def exhausted(self) -> bool:
        return self.taken >= self.limit


def bench_http(url: str, model: str, version: str | None, protocol: str, input_path: Path | None,
               options: LoadOptions, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """The concurrency sweep over HTTP; returns the JSON document."""
    if protocol not in ("http-binary", "http-json"):
        raise BenchError(f"--protocol {protocol}: HTTP load tests use http-binary or http-json")
    check_url(url)
    arrays, meta = model_inputs(url, model, version, input_path, options.timeout_s)
    target = HttpTarget(url, model, version, arrays, protocol, options.timeout_s)
    preflight(target.worker(), f"model {model} at {url}")
    return {
        "mode": "http", "url": url, "model": model, "version": served_version(meta, version),
        "protocol": protocol, "inputs": {k: {"dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()},
        "input_source": str(input_path) if input_path else "random, shaped by the model's metadata",
        "request_bytes": len(target.body), "warmup": options.warmup, "duration_s": options.duration_s,
        "iterations": options.iterations, "results": run_levels(target.worker, options, on_progress),
    }


def served_version(meta: dict[str, Any], asked: str | None) -> str | None:
    """The version that answers: the one asked for, else the metadata's."""
    return asked or (meta.get("parameters") or {}).get("version")
