"""The model repository: bundles on disk, their load state, and hot swaps.

Each (name, version) is one ``ModelEntry``. Loading builds the new
``LoadedModel`` before the old one is swapped out (as MLServer does), and the
old one unloads only after its in-flight requests finish.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from edged.batching import BatchMetrics, Batcher
from edged.bundle import MANIFEST, Bundle, Manifest, is_archive, open_bundle, read_manifest, semver_key
from edged.config import Config
from edged.errors import BundleError, EdgedError, ModelNotFound, ModelNotReady
from edged.metrics import Metrics
from edged.model_entry import ModelEntry, ModelState
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions

log = logging.getLogger(__name__)

NAME_LOCKS = 64
# Test hook: while the file EDGED_TEST_LOAD_GATE names exists, model loads wait (a slow load).
LOAD_GATE_ENV = "EDGED_TEST_LOAD_GATE"
BROKEN_VERSION = "unusable"  # the version an unusable bundle is listed under


def _version_key(version: str) -> tuple:
    """Semver order; a non-semver version (an unusable bundle) sorts first."""
    try:
        return (1, semver_key(version))
    except EdgedError:
        return (0, version)


class ModelRegistry:
    """Finds bundles under ``config.models_path`` and loads/unloads them."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        self._broken: dict[str, str] = {}  # bundle path -> why its manifest is unreadable
        self._lock = threading.RLock()
        self._name_locks = [threading.Lock() for _ in range(NAME_LOCKS)]
        # (path, size, mtime) of archives refused at unpacking -> why (not unpacked again)
        self._refused_archives: dict[tuple[str, int, int], str] = {}
        self.listeners: list[Callable[[str, ModelEntry], None]] = []
        # OTA-managed models: {state_dir}/store/{model}/active wins over models_dir.
        self.store_root = config.state_path / "store"
        self._active: dict[str, str] = {}  # model -> version that unversioned requests use
        self.batch_metrics = BatchMetrics.register(metrics.registry)

    # -- repository -------------------------------------------------------
    def _store_actives(self) -> dict[str, Path]:
        """model -> active bundle directory of OTA-managed models."""
        actives: dict[str, Path] = {}
        if not self.store_root.is_dir():
            return actives
        for model_dir in sorted(self.store_root.iterdir()):
            link = model_dir / "active"
            if link.is_symlink() and (link / MANIFEST).is_file():
                actives[model_dir.name] = link.resolve()
        return actives

    def _candidates(self) -> Iterator[Path]:
        root = self.config.models_path
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            if (path.is_dir() and (path / MANIFEST).is_file()) or is_archive(path):
                yield path

    def scan(self) -> None:
        """Refresh the index from disk; loaded entries are kept."""
        with self._lock:
            self._broken.clear()
            seen: set[tuple[str, str]] = set()
            actives = self._store_actives()
            for model, version in list(self._active.items()):
                if model not in actives:
                    del self._active[model]
            for path in [*actives.values(), *self._candidates()]:
                try:
                    manifest = self._read_bundle_manifest(path)
                except EdgedError as exc:
                    self._broken[str(path)] = str(exc)
                    self._note_broken(path, str(exc), seen)
                    continue
                key = (manifest.name, manifest.version)
                if manifest.name in actives and path != actives[manifest.name]:
                    continue  # OTA manages this model: only its active version is served
                if manifest.name in actives:
                    self._active[manifest.name] = manifest.version
                if key in seen:
                    log.warning("bundle %s duplicates %s %s; ignored", path, *key)
                    continue
                seen.add(key)
                entry = self._entries.get(key)
                if entry is None:
                    self._entries[key] = self._new_entry(manifest.name, manifest.version, path, manifest.runtime)
                elif entry.state is not ModelState.READY:
                    entry.source = path
                    entry.runtime = manifest.runtime
            for key in [k for k, e in self._entries.items() if k not in seen and not e.ready]:
                del self._entries[key]

    def _read_bundle_manifest(self, path: Path) -> Manifest:
        """A bundle's manifest; an archive is unpacked (within the extraction limits)
        once per content: a refused archive is not unpacked again until it changes."""
        if not is_archive(path):
            return read_manifest(path)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._refused_archives:
            raise BundleError(self._refused_archives[key])
        try:
            return open_bundle(path, self._unpack_dir(), verify=False).manifest
        except EdgedError as exc:
            self._refused_archives = {k: v for k, v in self._refused_archives.items() if k[0] != str(path)}
            self._refused_archives[key] = str(exc)
            raise

    def _note_broken(self, path: Path, reason: str, seen: set[tuple[str, str]]) -> None:
        """List an unusable bundle in the index as FAILED under its file name, so the
        repository index and model metadata say why (not only the log)."""
        name = path.name.removesuffix(".tar.gz").removesuffix(".tgz")
        key = (name, BROKEN_VERSION)
        if key in seen:
            return
        if key not in self._entries:
            log.warning("bundle %s is unusable: %s", path, reason)
        seen.add(key)
        entry = self._entries.get(key) or self._new_entry(name, BROKEN_VERSION, path, "")
        entry.state, entry.reason = ModelState.FAILED, f"unusable bundle {path.name}: {reason}"
        self._entries[key] = entry

    def _new_entry(self, name: str, version: str, source: Path, runtime: str) -> ModelEntry:
        return ModelEntry(
            name=name, version=version, source=source, runtime=runtime,
            max_concurrency=self.config.max_concurrency, max_queue=self.config.max_queue,
        )

    def _unpack_dir(self) -> Path:
        path = self.config.state_path / "unpacked"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def index(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.name, _version_key(e.version)))

    def broken(self) -> dict[str, str]:
        with self._lock:
            return dict(self._broken)

    def names(self) -> list[str]:
        return sorted({e.name for e in self.index()})

    def versions(self, name: str) -> list[ModelEntry]:
        """The versions of ``name``, oldest first (only this name's entries are sorted)."""
        with self._lock:
            entries = [e for e in self._entries.values() if e.name == name]
        return sorted(entries, key=lambda e: _version_key(e.version))

    # -- lookup -----------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for name/version; without a version, the newest ready one
        (the pinned one of an OTA-managed model while it is ready)."""
        with self._lock:  # one pass over the entries; versions are sorted only when a name has several
            if version:
                found = self._entries.get((name, version))
                if found is not None:
                    return found
            entries = [e for e in self._entries.values() if e.name == name]
        if not entries:
            raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(self.names()) or 'none'}")
        if version or len(entries) > 1:
            entries.sort(key=lambda e: _version_key(e.version))
        if version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; versions: {', '.join(e.version for e in entries)}"
            )
        if len(entries) == 1:
            return entries[0]
        pinned = self._active.get(name)
        for entry in entries:
            if entry.version == pinned and entry.ready:
                return entry
        ready = [e for e in entries if e.ready]
        return (ready or entries)[-1]

    # -- load / unload ----------------------------------------------------
    def _name_lock(self, name: str) -> threading.Lock:
        """One of a fixed set of locks: loads of one name are serialized, and no
        state is kept per name (unknown names included)."""
        return self._name_locks[hash(name) % len(self._name_locks)]

    def options_for(self, runtime: str) -> RuntimeOptions:
        extra = dict(self.config.runtime_options.get(runtime, {}))
        threads = int(extra.pop("threads", self.config.threads))
        return RuntimeOptions(threads=threads, extra=extra)

    def load(self, name: str) -> list[ModelEntry]:
        """(Re)load ``name`` per the version policy. Raises ModelNotFound when
        no bundle has that name, ModelNotReady when every version failed."""
        with self._name_lock(name):
            self.scan()
            known = self.versions(name)
            entries = [e for e in known if e.version != BROKEN_VERSION]
            if not known:
                raise ModelNotFound(f"no bundle named {name!r} in {self.config.models_path}")
            if not entries:
                raise ModelNotReady(f"model {name} cannot load: {known[0].reason}")
            wanted = entries[-1:] if self.config.versions == "latest" else entries
            for entry in entries:
                if entry not in wanted and entry.state is not ModelState.UNAVAILABLE:
                    self._unload_entry(entry)
            for entry in wanted:
                self._load_entry(entry)
            if not any(e.ready for e in wanted):
                reasons = "; ".join(f"{e.version}: {e.reason}" for e in wanted)
                raise ModelNotReady(f"model {name} failed to load: {reasons}")
            return wanted

    def _load_entry(self, entry: ModelEntry) -> None:
        previous_state = entry.state
        if previous_state is not ModelState.READY:
            entry.state, entry.reason = ModelState.LOADING, ""
        self._wait_for_gate()
        try:
            bundle: Bundle = open_bundle(entry.source, self._unpack_dir())
            new = LoadedModel.load(bundle, self.options_for(bundle.manifest.runtime), self.config.warmup_runs)
            try:
                batcher = self._batcher_for(entry, new)
            except EdgedError:
                new.unload()
                raise
        except EdgedError as exc:
            self._fail(entry, str(exc), keep_serving=previous_state is ModelState.READY)
            return
        except Exception as exc:  # a runtime library's own error type
            self._fail(entry, f"{type(exc).__name__}: {exc}", keep_serving=previous_state is ModelState.READY)
            return
        old, old_batcher = entry.model, entry.batcher
        entry.typical_latency_s = None if batcher else new.warm_latency_s
        entry.batcher = batcher
        if old_batcher is not None:
            old_batcher.close()
        entry.model, entry.state, entry.reason = new, ModelState.READY, ""
        entry.runtime = new.bundle.manifest.runtime
        if old is not None:
            entry.wait_idle(timeout=30.0)
            old.unload()
        self.metrics.load_time.labels(entry.name, entry.version, entry.runtime).set(new.load_seconds)
        self._publish("loaded", entry)
        log.info("loaded %s %s (%s) in %.3fs", entry.name, entry.version, entry.runtime, new.load_seconds)

    def _batcher_for(self, entry: ModelEntry, model: LoadedModel) -> Batcher | None:
        """A dynamic batcher when [models.<name>] asks for one; BundleError when the model
        has no dynamic batch dimension to merge along (as Triton refuses such a load)."""
        settings = self.config.model_settings(entry.name)
        if not settings.batching:
            return None
        problem = model.dynamic_batch_problem()
        if problem:
            raise BundleError(
                f"max_batch_size = {settings.max_batch_size} in [models.{entry.name}] needs a dynamic batch "
                f"dimension (-1) first in every input and output, but {problem}; set max_batch_size = 0 "
                "or export the model with a dynamic batch dimension"
            )
        # A batched model never runs on the event loop (typical_latency_s stays None):
        # its requests wait for each other in worker threads.
        return Batcher(entry, settings, self.batch_metrics)

    @staticmethod
    def _wait_for_gate() -> None:
        gate = os.environ.get(LOAD_GATE_ENV)
        if not gate:
            return
        deadline = time.monotonic() + 600
        while os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _fail(self, entry: ModelEntry, reason: str, keep_serving: bool) -> None:
        log.error("model %s %s failed to load: %s", entry.name, entry.version, reason)
        if keep_serving:
            entry.reason = f"reload failed, still serving the previous load: {reason}"
        else:
            entry.state, entry.reason, entry.model = ModelState.FAILED, reason, None
        self._publish("failed", entry)

    def adopt(self, model: LoadedModel, source: Path) -> list[ModelEntry]:
        """Serve an already loaded (warmed, self-tested) model as its name's active
        version: new requests go to it at once; other versions of the name
        finish their in-flight requests, then unload. Returns those entries."""
        name, version = model.name, model.version
        with self._name_lock(name):
            with self._lock:
                key = (name, version)
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._new_entry(name, version, source, model.bundle.manifest.runtime)
                batcher = self._batcher_for(entry, model)  # BundleError before anything is swapped
                self._entries[key] = entry
                previous_model, previous_batcher = entry.model, entry.batcher
                entry.batcher = batcher
                entry.source, entry.runtime = source, model.bundle.manifest.runtime
                entry.model, entry.state, entry.reason = model, ModelState.READY, ""
                entry.served = entry.errors = 0
                entry.typical_latency_s = None if batcher else model.warm_latency_s
                self._active[name] = version
                others = [e for e in self._entries.values() if e.name == name and e is not entry]
            if previous_batcher is not None:
                previous_batcher.close()
            if previous_model is not None and previous_model is not model:
                entry.wait_idle(timeout=30.0)
                previous_model.unload()
            self.metrics.load_time.labels(name, version, entry.runtime).set(model.load_seconds)
            self._publish("loaded", entry)
            for other in others:
                self._unload_entry(other)
                with self._lock:
                    self._entries.pop((other.name, other.version), None)
            return others

    def unload(self, name: str) -> list[ModelEntry]:
        with self._name_lock(name):
            entries = self.versions(name)
            if not entries:
                raise ModelNotFound(f"unknown model {name!r}")
            for entry in entries:
                self._unload_entry(entry)
            return entries

    def _unload_entry(self, entry: ModelEntry) -> None:
        model, batcher = entry.model, entry.batcher
        entry.state, entry.reason, entry.model, entry.batcher = ModelState.UNAVAILABLE, "unloaded", None, None
        if batcher is not None:
            batcher.close()  # its queued batches still run: they fail as not ready
        if model is not None:
            entry.wait_idle(timeout=30.0)
            model.unload()
            self._publish("unloaded", entry)

    def load_initial(self) -> None:
        """Load what ``config.load`` names; failures are recorded, never raised."""
        self.scan()
        names = self.names() if "*" in self.config.load else self.config.load
        for name in sorted(set(self.config.models) - set(self.names())):
            log.warning("[models.%s] is configured but there is no bundle named %s", name, name)
        for name in names:
            try:
                self.load(name)
            except EdgedError as exc:
                log.error("%s", exc)

    def unload_all(self) -> None:
        for name in self.names():
            self.unload(name)

    def _publish(self, event: str, entry: ModelEntry) -> None:
        self.metrics.model_ready.labels(entry.name, entry.version).set(1 if entry.ready else 0)
        self.metrics.models_loaded.set(sum(1 for e in self.index() if e.ready))
        for listener in list(self.listeners):
            try:
                listener(event, entry)
            except Exception:  # a listener must never break loading
                log.exception("model event listener failed")
