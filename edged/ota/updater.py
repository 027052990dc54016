"""The device side of OTA: one update at a time per model, through these states::

    downloading -> verifying -> unpacking -> loading -> warming -> self_testing
      -> swapping -> persisting -> watching -> active
    (or refused / failed at any step before swapping; rolled_back after it)

Each state is written to the model's journal (fsynced) before its work starts,
so a restart after kill -9 or power loss knows where it was (``recover``).
Before ``persisting`` the ``active`` link still names the old version, after it
the new one; the registry serves whatever the link names at start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edged.bundle import _bundle_root, open_bundle, safe_extract, semver_key, sha256_file
from edged.config import Config
from edged.errors import BundleError, EdgedError, ModelNotFound, SignatureError, UpdateFailed, UpdateRefused
from edged.metrics import Metrics
from edged.model import LoadedModel
from edged.ota.download import DownloadPolicy, check_disk_space, download
from edged.ota.intent import REFUSALS, IntentGate, url_allowed
from edged.ota.health import HealthWatch
from edged.ota.message import OtaMessage
from edged.ota.store import ModelStore
from edged.registry import ModelRegistry
from edged.signing import read_archive_manifest, trusted_keys, verify_bundle_signature, verify_manifest_bytes

log = logging.getLogger(__name__)

STATES = (
    "idle", "downloading", "verifying", "unpacking", "loading", "warming", "self_testing",
    "swapping", "persisting", "watching", "active", "failed", "refused", "rolled_back",
)
BEFORE_SWAP = ("downloading", "verifying", "unpacking", "loading", "warming", "self_testing", "swapping")
# Test hooks, read at start: EDGED_OTA_CRASH_AT=<state> kills the daemon with SIGKILL as it
# enters that state; EDGED_OTA_PAUSE_AT=<state> holds the update in that state (its journal
# written) until the daemon stops, so that `make test-vm` can cut the VM's power there.
CRASH_ENV = "EDGED_OTA_CRASH_AT"
PAUSE_ENV = "EDGED_OTA_PAUSE_AT"


@dataclass
class ModelUpdate:
    """What one model's worker is doing, mirrored in its journal."""

    state: str = "idle"
    target: str = ""
    reason: str = ""
    progress: dict[str, int] = field(default_factory=dict)


class Updater(HealthWatch):
    """Applies OTA messages to the registry; serialized per model."""

    def __init__(self, config: Config, registry: ModelRegistry, metrics: Metrics) -> None:
        self.config = config
        self.cfg = config.ota
        self.registry = registry
        self.device = config.device
        self.store = ModelStore(registry.store_root)
        self.work = config.state_path / "ota"
        self.downloads = self.work / "downloads"
        self.staging = self.work / "staging"
        self.status_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._updates: dict[str, ModelUpdate] = {}
        self._pending: dict[str, OtaMessage] = {}
        self._in_progress: dict[str, str] = {}  # model -> sha256 being applied
        self._workers: dict[str, threading.Thread] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._crash_at = os.environ.get(CRASH_ENV, "")
        self._pause_at = os.environ.get(PAUSE_ENV, "")
        self._last_progress = 0.0
        self._setup_metrics(metrics)
        self.gate = IntentGate(
            config.resolve(self.cfg.trusted_keys_dir), self.work / "intents.json", self.cfg.allow_unsigned,
            self.cfg.allowed_url_prefixes, on_refused=lambda kind: self.m_intents_refused.labels(kind).inc(),
        )

    # -- metrics ------------------------------------------------------------
    def _setup_metrics(self, metrics: Metrics) -> None:
        from prometheus_client import Counter, Gauge

        r = metrics.registry
        self.m_state = Gauge("edged_ota_state", "1 for the OTA state each model is in.", ["model", "state"], registry=r)
        self.m_updates = Counter("edged_ota_updates", "OTA update attempts by result.", ["model", "result"], registry=r)
        self.m_rollbacks = Counter("edged_ota_rollbacks", "Rollbacks to a previous version.", ["model"], registry=r)
        self.m_bytes = Counter("edged_ota_download_bytes", "Bytes downloaded for OTA updates.", registry=r)
        self.m_intents_refused = Counter("edged_ota_intents_refused", "OTA messages refused before any action, by reason.",
                                         ["reason"], registry=r)
        for kind in REFUSALS:
            self.m_intents_refused.labels(kind)

    # -- lifecycle ------------------------------------------------------------
    def recover(self) -> list[str]:
        """Before models load: settle every journal left by a crash. Returns
        one line per model saying what was found and done."""
        shutil.rmtree(self.staging, ignore_errors=True)
        notes: list[str] = []
        for model, journal in self.store.journals().items():
            state = journal.get("state", "idle")
            active = self.store.active_version(model)
            target = journal.get("target", "")
            note = ""
            if state == "persisting" and active == target:
                state = "watching"
                journal.update(state="watching", swapped_at=time.time(), boots=0, clean_stop=False)
                note = f"restart after the switch to {target}: watching it"
            if state in BEFORE_SWAP or state == "persisting":
                journal.update(
                    state="failed",
                    reason=f"interrupted while {state} by a restart; {active or 'the previous version'} kept serving; "
                    "the update resumes when its message arrives again",
                )
                note = f"update to {target} interrupted while {state}; serving {active or 'the bundle in models_dir'}"
            elif state == "watching":
                journal["boots"] = int(journal.get("boots", 0)) + (0 if journal.get("clean_stop") else 1)
                journal["clean_stop"] = False
                if journal["boots"] >= self.cfg.crash_loop_restarts and journal.get("previous"):
                    reason = f"crash loop: {journal['boots']} unclean restarts within {self.cfg.health_window_s:.0f}s of the update"
                    self._rollback_on_disk(model, journal, reason)
                    note = f"{target} rolled back to {journal['previous']}: {reason}"
                elif time.time() - float(journal.get("swapped_at", 0)) > self.cfg.health_window_s:
                    journal.update(state="active", reason="")
                    # The same line as a live watch ends with, so logs read alike either way.
                    log.info("OTA %s: active (its %.0f s health window ended while the daemon was down)",
                             model, self.cfg.health_window_s)
                    note = f"{target} passed its health window while the daemon was down: active"
                else:
                    note = f"{target} still inside its health window ({journal['boots']} unclean restart(s))"
            self.store.write_journal(model, journal)
            self._updates[model] = ModelUpdate(journal.get("state", "idle"), target, journal.get("reason", ""))
            self._set_state_metric(model, self._updates[model].state)
            if note:
                log.warning("OTA recovery: %s: %s", model, note)
                notes.append(f"{model}: {note}")
        return notes

    def start(self) -> None:
        self._watcher = threading.Thread(target=self._watch_loop, name="edged-ota-health", daemon=True)
        self._watcher.start()
        self._emit()

    def stop(self) -> None:
        self._stop.set()
        for worker in list(self._workers.values()):
            worker.join(timeout=10)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        for model, journal in self.store.journals().items():
            if journal.get("state") == "watching":
                journal["clean_stop"] = True
                self.store.write_journal(model, journal)

    # -- status -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        names = set(self._updates) | set(self.store.models()) | set(self.registry.names())
        for name in sorted(names):
            update = self._updates.get(name, ModelUpdate())
            try:
                active = self.registry.get(name).version
            except ModelNotFound:
                active = self.store.active_version(name) or ""
            journal = self.store.read_journal(name) if (self.store.root / name).is_dir() else {}
            models[name] = {
                "active": active, "state": update.state, "target": update.target, "reason": update.reason,
                "progress": dict(update.progress), "installed": self.store.installed(name),
                "previous": journal.get("previous", ""),
            }
        return {"device": self.device, "groups": list(self.cfg.groups), "time": time.time(), "models": models}

    def _emit(self) -> None:
        status = self.status()
        for listener in list(self.status_listeners):
            try:
                listener(status)
            except Exception:
                log.exception("OTA status listener failed")

    def _set_state_metric(self, model: str, state: str) -> None:
        for name in STATES:
            self.m_state.labels(model, name).set(1 if name == state else 0)

    def _enter(self, model: str, state: str, journal: dict[str, Any] | None = None, reason: str = "") -> None:
        update = self._updates.setdefault(model, ModelUpdate())
        update.state, update.reason = state, reason
        if state != "downloading":
            update.progress = {}
        if journal is not None:
            journal.update(state=state, reason=reason, updated_at=time.time())
            update.target = journal.get("target", update.target)
            self.store.write_journal(model, journal)
        self._set_state_metric(model, state)
        log.info("OTA %s: %s%s", model, state, f" ({reason})" if reason else "")
        self._emit()
        if self._crash_at == state:
            log.error("OTA test hook %s=%s: killing the daemon", CRASH_ENV, state)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._pause_at == state:
            log.warning("OTA test hook %s=%s: update paused in this state", PAUSE_ENV, state)
            self._stop.wait()

    # -- intake ---------------------------------------------------------------
    def submit(self, message: OtaMessage) -> str:
        """Queue an update; the newest message per model wins. Returns what was done.
        Raises UpdateRefused when the intent is unsigned, altered, signed by an
        unknown key, names a URL outside ota.allowed_url_prefixes, or is a replay."""
        self.gate.verify(message)
        if not message.targets(self.device):
            return "not targeted"
        self.gate.admit(message)
        with self._lock:
            self._pending[message.model] = message
            worker = self._workers.get(message.model)
            if worker is None or not worker.is_alive():
                worker = threading.Thread(target=self._worker, args=(message.model,), name=f"edged-ota-{message.model}", daemon=True)
                self._workers[message.model] = worker
                worker.start()
        return "queued"

    def _worker(self, model: str) -> None:
        while not self._stop.is_set():
            with self._lock:
                message = self._pending.pop(model, None)
                if message is None:
                    self._workers.pop(model, None)
                    return
            with self._model_lock(model):
                with self._lock:
                    self._in_progress[model] = message.sha256
                try:
                    self._apply(message)
                finally:
                    with self._lock:
                        self._in_progress.pop(model, None)

    def _model_lock(self, model: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(model, threading.Lock())

    # -- the state machine ------------------------------------------------------
    def _apply(self, message: OtaMessage) -> None:
        model, version = message.model, message.version
        journal = self.store.read_journal(model)
        key = f"{version}:{message.sha256}:{message.published_at}"
        if key in journal.get("refused", {}):
            return  # already refused or rolled back: a retained message comes back on every connect
        current = self._current_version(model)
        if current == version:
            if journal.get("state") not in ("active", "watching"):
                journal.update(target=version)
                self._enter(model, "active", journal)
            return
        update = self._updates.setdefault(model, ModelUpdate())
        update.target = version
        journal.update(target=version, sha256=message.sha256, published_at=message.published_at, url=message.url)
        try:
            if current and semver_key(version) < semver_key(current) and not message.allow_downgrade:
                raise UpdateRefused(f"downgrade from {current} to {version} refused (the message does not allow_downgrade)")
            self._run_update(message, journal, current)
            self.m_updates.labels(model, "success").inc()
        except (UpdateRefused, SignatureError, BundleError) as exc:
            journal.setdefault("refused", {})[key] = str(exc)
            self._enter(model, "refused", journal, str(exc))
            self.m_updates.labels(model, "refused").inc()
        except (UpdateFailed, EdgedError, OSError) as exc:
            self._enter(model, "failed", journal, str(exc))
            self.m_updates.labels(model, "failed").inc()
        except Exception as exc:  # a runtime library's own error while loading
            journal.setdefault("refused", {})[key] = f"{type(exc).__name__}: {exc}"
            self._enter(model, "refused", journal, f"{type(exc).__name__}: {exc}")
            self.m_updates.labels(model, "refused").inc()

    def _current_version(self, model: str) -> str:
        try:
            entry = self.registry.get(model)
        except ModelNotFound:
            return self.store.active_version(model) or ""
        return entry.version if entry.ready else (self.store.active_version(model) or entry.version)

    def _run_update(self, message: OtaMessage, journal: dict[str, Any], current: str) -> None:
        model, version = message.model, message.version
        keys = trusted_keys(self.config.resolve(self.cfg.trusted_keys_dir))
        if not keys and not self.cfg.allow_unsigned:
            raise UpdateRefused(
                f"no trusted keys in {self.config.resolve(self.cfg.trusted_keys_dir)} (ota.trusted_keys_dir) "
                "and allow_unsigned is false"
            )
        archive = self.downloads / f"{message.sha256}.tar.gz"
        if self.downloads.is_dir():  # partial downloads of releases no longer wanted
            for stale in self.downloads.iterdir():
                if not stale.name.startswith(message.sha256) and stale.name.split(".")[0] not in self._wanted_shas():
                    stale.unlink(missing_ok=True)
        check_disk_space(self.work, 0 if archive.exists() else message.size * 3)

        self._enter(model, "downloading", journal)
        policy = DownloadPolicy(self.cfg.max_bundle_bytes, self.cfg.download_timeout_s,
                                self.cfg.download_retries, self.cfg.retry_backoff_s)
        resumes: list[int] = []
        already = archive.exists()
        download(message.url, archive, message.size, policy, lambda got, total: self._progress(model, got, total),
                 self._stop, resumes, lambda url: url_allowed(url, self.cfg.allowed_url_prefixes))
        if not already:
            self.m_bytes.inc(message.size - (resumes[0] if resumes else 0))
        journal["download_resumed_from"] = resumes

        self._enter(model, "verifying", journal)
        digest = sha256_file(archive)
        if digest != message.sha256:
            archive.unlink(missing_ok=True)
            raise UpdateRefused(f"bundle sha256 {digest[:12]}… does not match the message ({message.sha256[:12]}…)")
        manifest_bytes, bundled_sig = read_archive_manifest(archive)
        if message.signature is not None or bundled_sig is not None or not self.cfg.allow_unsigned:
            signatures = [s for s in (message.signature, bundled_sig) if s is not None]
            if not signatures:
                raise SignatureError("bundle is unsigned (no manifest.sig) and allow_unsigned is false")
            for signature in signatures:
                verify_manifest_bytes(manifest_bytes, signature, keys)

        self._enter(model, "unpacking", journal)
        self.staging.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{model}-{version}-", dir=self.staging))
        try:
            safe_extract(archive, staging)
            root = _bundle_root(staging)
            bundle = open_bundle(root)  # every file's sha256 against the manifest
            if (bundle.manifest.name, bundle.manifest.version) != (model, version):
                raise UpdateRefused(
                    f"bundle is {bundle.manifest.name} {bundle.manifest.version}, the message says {model} {version}"
                )
            verify_bundle_signature(root, keys, allow_unsigned=self.cfg.allow_unsigned, signature=message.signature)
            if current and self.store.active_version(model) is None:
                self._import_current(model, current)
            installed = self.store.install(model, version, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        self._enter(model, "loading", journal)
        bundle = open_bundle(installed, verify=False)
        loaded = LoadedModel.load(bundle, self.registry.options_for(bundle.manifest.runtime), warmup=0)
        try:
            self._enter(model, "warming", journal)
            loaded.warm_up(self.config.warmup_runs)
            self._enter(model, "self_testing", journal)
            worst = loaded.self_test()
            if worst > 1.0:
                raise UpdateRefused(
                    f"self-test failed: outputs differ from samples.npz by {worst:.1f}x the manifest tolerance"
                )
        except BaseException:
            loaded.unload()
            raise

        self._enter(model, "swapping", journal)
        self.registry.adopt(loaded, installed)
        self._enter(model, "persisting", journal)
        previous = self.store.active_version(model) or current
        self.store.activate(model, version)
        history = [v for v in journal.get("history", []) if v != version] + [version]
        journal.update(previous=previous if previous != version else journal.get("previous", ""),
                       history=history[-20:], swapped_at=time.time(), boots=0, clean_stop=False)
        self._enter(model, "watching", journal)
        archive.unlink(missing_ok=True)
        self.store.prune(model, self.cfg.keep_versions, protect={journal.get("previous", "")})

    def _wanted_shas(self) -> set[str]:
        with self._lock:
            return {m.sha256 for m in self._pending.values()} | set(self._in_progress.values())

    def _import_current(self, model: str, version: str) -> None:
        """First OTA update of a model served from models_dir: copy the running
        bundle into the store so a rollback has somewhere to go."""
        entry = self.registry.get(model, version)
        source = entry.model.bundle.root if entry.model is not None else entry.source
        if source.is_dir():
            self.store.import_copy(model, version, source)
            self.store.activate(model, version)

    def _progress(self, model: str, got: int, total: int) -> None:
        update = self._updates.setdefault(model, ModelUpdate())
        update.progress = {"bytes": got, "total": total}
        now = time.monotonic()
        if now - self._last_progress >= 1.0 or got == total:
            self._last_progress = now
            self._emit()
