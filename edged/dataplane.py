"""The data plane: the only API that transports call.

It is synchronous and thread-safe. Async transports run ``infer`` in a worker
thread so blocking inference never blocks their event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from time import perf_counter
from dataclasses import dataclass, field
import logging
from typing import Any, Callable

import numpy as np

from edged import __version__
from edged.config import Config
from edged.errors import EdgedError, InferenceFailed, InvalidInput, ModelNotReady, UpdateRefused
from edged.metrics import Metrics, fast_inc, fast_observe
from edged.model_entry import ModelEntry
from edged.registry import ModelRegistry

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics_metrics"]
INLINE_MAX_BYTES = 64 * 1024  # larger inputs (big batches) always go to a worker thread
OUTLIER_FACTOR = 2.0  # a run counts at most this many times the typical latency in its average


@dataclass
class InferenceRequest:
    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    outputs: list[str] | None = None  # None: all outputs
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferenceResponse:
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None


@dataclass
class ModelSeries:
    """What every inference of a model version over one transport does to its metrics,
    resolved once: ``labels()`` takes a lock and builds a tuple on every call."""

    requests: Callable[[float], None]
    depth: Callable[[float], None]  # +1 when a request starts waiting for a slot, -1 when it is done
    queue_time: Callable[[float], None]
    latency: Callable[[float], None]

    @classmethod
    def of(cls, metrics: Metrics, name: str, version: str, runtime: str, transport: str) -> "ModelSeries":
        return cls(requests=fast_inc(metrics.requests.labels(name, version, transport)),
                   depth=fast_inc(metrics.queue_depth.labels(name, version)),
                   queue_time=fast_observe(metrics.queue_time.labels(name, version)),
                   latency=fast_observe(metrics.latency.labels(name, version, runtime)))


class DataPlane:
    """Health, metadata, inference and repository control."""

    def __init__(self, config: Config, registry: ModelRegistry, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.started = time.time()
        self._startup_done = threading.Event()
        self.ota: Any = None  # edged.ota.updater.Updater when [ota] is enabled
        # Called with (request, response, transport) after each successful inference.
        self.result_listeners: list[Callable[[InferenceRequest, InferenceResponse, str], None]] = []
        self._model_series: dict[tuple[str, str, str, str], ModelSeries] = {}

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        """Load the configured models, then mark the server ready."""
        self.registry.load_initial()
        self._startup_done.set()

    def stop(self) -> None:
        self._startup_done.clear()
        self.registry.unload_all()

    # -- health and metadata ---------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready once the initial load pass has finished (a model that failed
        is reported per model, not by holding the whole server back)."""
        return self._startup_done.is_set()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edged", "version": __version__, "extensions": EXTENSIONS}

    def check_model(self, name: str, version: str | None = None) -> ModelEntry:
        """Raise ModelNotFound early, before a transport decodes a large body; the
        entry found can be handed to :meth:`infer` so it is not looked up again."""
        return self.registry.get(name, version)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.registry.get(name, version).ready

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry = self.registry.get(name, version)
        data: dict[str, Any] = {
            "name": entry.name,
            "versions": [e.version for e in self.registry.versions(name)],
            "platform": _platform(entry.runtime),
            "state": entry.state.value,
        }
        if entry.reason:
            data["reason"] = entry.reason
        model = entry.model
        if model is not None:
            manifest = model.bundle.manifest
            data["inputs"] = [_tensor_meta(t) for t in manifest.inputs]
            data["outputs"] = [_tensor_meta(t) for t in manifest.outputs]
            data["parameters"] = {
                "version": entry.version,
                "hw_profile": manifest.hw_profile,
                "labels": manifest.labels,
                "validation": manifest.validation,
            }
        return data

    # -- inference --------------------------------------------------------
    def infer(self, request: InferenceRequest, transport: str = "local",
              entry: ModelEntry | None = None) -> InferenceResponse:
        """Run ``request``; ``entry`` is the model version :meth:`check_model` found for
        it (looked up here when not given)."""
        version_label = request.version or ""
        try:
            if entry is None:
                entry = self.registry.get(request.model, request.version)
            version_label = entry.version
            series = self._model_series.get((entry.name, version_label, entry.runtime, transport))
            if series is None:
                series = self._series(entry, transport)
            series.requests(1)
            try:
                response = self._run(entry, request, series)
            except ModelNotReady:
                # A hot swap unloaded this version between lookup and start: an
                # unversioned request goes to the version that replaced it.
                fresh = None if request.version else self.registry.get(request.model)
                if fresh is None or fresh is entry or not fresh.ready:
                    raise
                entry = fresh
                response = self._run(entry, request, self._series(entry, transport))
        except EdgedError as exc:
            if entry is None:
                self.metrics.requests.labels(request.model, version_label, transport).inc()
            self.metrics.failures.labels(request.model, version_label, transport, exc.code).inc()
            raise
        if self.result_listeners:
            self._notify(request, response, transport)
        return response

    def runs_inline(self, request: InferenceRequest, max_us: float, entry: ModelEntry | None = None) -> bool:
        """Whether ``request`` is cheap enough to run on the caller's event loop: its
        model version answers in under ``max_us`` on average and the inputs are small.
        A thread hop costs more than such an inference (about 200 us here)."""
        if max_us <= 0:
            return False
        if entry is None:
            entry = self.registry.get(request.model, request.version)
        if entry.batcher is not None:  # it waits for other requests; infer_on_loop batches it on a loop
            return False
        typical = entry.typical_latency_s
        if typical is None or typical * 1e6 > max_us or not entry.ready:
            return False
        size = 0
        for array in request.inputs.values():
            size += array.nbytes
        return size <= INLINE_MAX_BYTES

    def _series(self, entry: ModelEntry, transport: str) -> ModelSeries:
        """The metrics of one model version (and runtime) over ``transport``, resolved once."""
        key = (entry.name, entry.version, entry.runtime, transport)
        series = self._model_series.get(key)
        if series is None:
            series = self._model_series[key] = ModelSeries.of(self.metrics, *key)
        return series

    def _run(self, entry: ModelEntry, request: InferenceRequest, series: ModelSeries) -> InferenceResponse:
        series.depth(1)
        try:
            if entry.batcher is not None:  # validates, waits for its batch, counts; raises EdgedError
                return self._from_batch(entry, request, series, entry.batcher.infer(request.inputs))
            else:
                model, waited = entry.acquire()
                ok: bool | None = None  # counted (entry.served, entry.errors) once the model ran
                noted: float | None = None
                try:
                    series.queue_time(waited)
                    start = perf_counter()
                    try:
                        outputs = model.infer(request.inputs)
                    except EdgedError as exc:
                        ok = not isinstance(exc, InferenceFailed)  # a bad request is not the model's fault
                        raise
                    except Exception as exc:  # a runtime's own exception type: its text stays in the log
                        ok = False
                        log.warning("model %s %s failed in %s: %s: %s", entry.name, entry.version, entry.runtime,
                                    type(exc).__name__, exc)
                        raise InferenceFailed(f"model {entry.name} failed in its runtime ({entry.runtime}); "
                                              "the daemon's log has the details") from None
                    elapsed = perf_counter() - start
                    ok = True
                    typical = entry.typical_latency_s
                    # The inline decision's average: a run that the OS paused (a busy machine) lifts
                    # it by at most 10 %, so a handful of them cannot send a fast model to worker
                    # threads (where the GIL wait inflates the next runs), while a model that really
                    # slows down still gets there within a few dozen runs. The histogram keeps
                    # every run as it was.
                    noted = elapsed if typical is None or elapsed < OUTLIER_FACTOR * typical else OUTLIER_FACTOR * typical
                    series.latency(elapsed)
                finally:
                    entry.release(ok, noted)  # the slot, the count and the average in one locked step
        finally:
            series.depth(-1)
        if request.outputs:
            return self._respond(entry, request, outputs)
        return InferenceResponse(model=entry.name, version=entry.version, outputs=outputs, id=request.id)

    @staticmethod
    def _respond(entry: ModelEntry, request: InferenceRequest, outputs: dict[str, np.ndarray]) -> InferenceResponse:
        """The response with the outputs the request asked for (all by default)."""
        if request.outputs:
            unknown = [n for n in request.outputs if n not in outputs]
            if unknown:
                raise InvalidInput(
                    f"unknown output(s) {', '.join(unknown)}; model {entry.name} has {', '.join(outputs)}"
                )
            outputs = {n: outputs[n] for n in request.outputs}
        return InferenceResponse(model=entry.name, version=entry.version, outputs=outputs, id=request.id)

    def _notify(self, request: InferenceRequest, response: InferenceResponse, transport: str) -> None:
        for listener in self.result_listeners:
            try:
                listener(request, response, transport)
            except Exception:  # a listener must never fail the request
                log.exception("result listener failed")

    def infer_on_loop(self, request: InferenceRequest, transport: str, entry: ModelEntry, inline_max_us: float,
                      reply: Callable[[InferenceResponse | EdgedError], None]) -> bool:
        """:meth:`infer` on an event loop for a small request to a cheap batched model: it
        joins a batch that runs on this loop (``Batcher.join_on_loop``), and ``reply`` gets
        the response or EdgedError there. False: not taken (:meth:`infer_batched` then);
        EdgedError for a request refused before it joined."""
        batcher = entry.batcher
        if batcher is None or inline_max_us <= 0:
            return False
        series = self._series(entry, transport)

        def done(outcome: Any) -> None:
            series.depth(-1)
            if isinstance(outcome, ModelNotReady) and not request.version:  # a hot swap unloaded this version
                task = asyncio.ensure_future(self.infer_batched(request, transport, entry, inline_max_us, counted=True))
                task.add_done_callback(lambda t: reply(t.exception() or t.result()))
                return
            try:
                if isinstance(outcome, EdgedError):
                    raise outcome
                response = self._from_batch(entry, request, series, outcome)
            except EdgedError as exc:
                self.metrics.failures.labels(entry.name, entry.version, transport, exc.code).inc()
                return reply(exc)
            if self.result_listeners:
                self._notify(request, response, transport)
            reply(response)

        series.depth(1)
        try:
            taken = batcher.join_on_loop(request.inputs, inline_max_us, done)
        except EdgedError as exc:
            series.requests(1)
            series.depth(-1)
            self.metrics.failures.labels(entry.name, entry.version, transport, exc.code).inc()
            raise
        if taken:
            series.requests(1)
        else:
            series.depth(-1)
        return taken

    async def infer_batched(self, request: InferenceRequest, transport: str, entry: ModelEntry,
                            inline_max_us: float = 0.0, counted: bool = False) -> InferenceResponse:
        """:meth:`infer` on an event loop for a model with a dynamic batcher: batched on this
        loop as :meth:`infer_on_loop` would, else by the batcher's workers (a hop per
        request). ``counted``: counted already (:meth:`infer_on_loop` hands it on)."""
        if not counted:
            self._series(entry, transport).requests(1)
        for attempt in range(2):
            series = self._series(entry, transport)
            series.depth(1)
            try:
                batcher = entry.batcher
                if batcher is None:  # a reload swapped in an unbatched model after the lookup
                    return await asyncio.to_thread(self._infer_unbatched, request, transport, entry)
                done = await batcher.submit_async(request.inputs, inline_max_us)
                response = self._from_batch(entry, request, series, done)
                break
            except ModelNotReady as exc:
                # A hot swap unloaded this version: an unversioned request goes to its successor.
                fresh = None if request.version or attempt else self.registry.get(request.model)
                if fresh is None or fresh is entry or not fresh.ready:
                    self.metrics.failures.labels(entry.name, entry.version, transport, exc.code).inc()
                    raise
                if fresh.batcher is None:
                    return await asyncio.to_thread(self._infer_unbatched, request, transport, fresh)
                entry = fresh
            except EdgedError as exc:
                self.metrics.failures.labels(entry.name, entry.version, transport, exc.code).inc()
                raise
            finally:
                series.depth(-1)
        if self.result_listeners:
            self._notify(request, response, transport)
        return response

    def _from_batch(self, entry: ModelEntry, request: InferenceRequest, series: ModelSeries,
                    done: Any) -> InferenceResponse:
        """The response from a request's share of its batch (a BatchedResult), with its
        queue time and its batch's run observed."""
        series.queue_time(done.queued_s)
        series.latency(done.run_s)
        return self._respond(entry, request, done.outputs)

    def _infer_unbatched(self, request: InferenceRequest, transport: str, entry: ModelEntry) -> InferenceResponse:
        try:
            response = self._run(entry, request, self._series(entry, transport))
        except EdgedError as exc:
            self.metrics.failures.labels(entry.name, entry.version, transport, exc.code).inc()
            raise
        self._notify(request, response, transport)
        return response

    # -- repository -------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        self.registry.scan()
        rows = []
        for entry in self.registry.index():
            if ready_only and not entry.ready:
                continue
            row = {"name": entry.name, "version": entry.version, "state": entry.state.value}
            if entry.reason:
                row["reason"] = entry.reason
            rows.append(row)
        return rows

    # -- OTA ---------------------------------------------------------------
    def _updater(self) -> Any:
        if self.ota is None:
            raise UpdateRefused("OTA updates are disabled on this device (set [ota] enabled = true)")
        return self.ota

    def ota_status(self) -> dict[str, Any]:
        return self._updater().status()

    def ota_update(self, payload: Any) -> str:
        """Queue an update from an OTA message (the same JSON as over MQTT)."""
        from edged.ota.message import OtaMessage

        return self._updater().submit(OtaMessage.parse(payload))

    def rollback(self, name: str, version: str | None = None) -> str:
        self.registry.get(name)
        return self._updater().rollback(name, version or None)

    def load_model(self, name: str) -> None:
        self.registry.load(name)

    def unload_model(self, name: str) -> None:
        self.registry.unload(name)


def _platform(runtime: str) -> str:
    return {"tflite": "tensorflow_lite", "onnx": "onnxruntime_onnx", "openvino": "openvino"}.get(runtime, runtime)


def _tensor_meta(spec: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
    if spec.layout:
        data["layout"] = spec.layout
    if spec.quantization is not None:
        data["quantization"] = spec.quantization.to_dict()
        data["accepted_datatypes"] = [
            "FP32" if d == "float32" else spec.datatype for d in spec.accepted_dtypes()
        ]
    return data
