"""The OTA updater's health watch after a swap, and rollback (automatic or
requested): a mixin of ``edged.ota.updater.Updater``, kept apart so each file
stays readable. It uses the updater's store, registry, journal states and locks."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from edged.bundle import open_bundle
from edged.errors import ModelNotFound, UpdateRefused
from edged.model import LoadedModel

if TYPE_CHECKING:
    from edged.ota.updater import ModelUpdate

log = logging.getLogger("edged.ota.updater")


class HealthWatch:
    """Watches each freshly swapped model's error rate for ``health_window_s``;
    rolls back to the previous version when it is over ``max_error_rate``."""

    _stop: threading.Event
    _updates: "dict[str, ModelUpdate]"

    def _watch_loop(self) -> None:
        while not self._stop.wait(0.5):
            for model, journal in self.store.journals().items():
                if journal.get("state") != "watching":
                    continue
                try:
                    self._check_health(model, journal)
                except Exception:
                    log.exception("OTA health check of %s failed", model)

    def _check_health(self, model: str, journal: dict[str, Any]) -> None:
        with self._model_lock(model):
            journal = self.store.read_journal(model)
            if journal.get("state") != "watching":
                return
            version = journal.get("target", "")
            try:
                entry = self.registry.get(model, version)
            except ModelNotFound:
                entry = None
            if entry is not None and entry.served >= self.cfg.min_requests:
                rate = entry.errors / entry.served
                if rate > self.cfg.max_error_rate:
                    reason = (f"error rate {rate:.0%} over {entry.served} requests after the update "
                              f"(limit {self.cfg.max_error_rate:.0%})")
                    self._rollback(model, journal, reason, to=journal.get("previous", ""))
                    return
            if time.time() - float(journal.get("swapped_at", 0)) >= self.cfg.health_window_s:
                self._enter(model, "active", journal)

    def rollback(self, model: str, to: str | None = None, reason: str = "requested by the operator") -> str:
        """Switch ``model`` back to ``to`` (default: the version before the active one)."""
        lock = self._model_lock(model)
        if not lock.acquire(timeout=5.0):
            update = self._updates.get(model)
            state = update.state if update is not None else "idle"
            raise UpdateRefused(f"an update of {model} is in progress ({state}); roll back when it has finished")
        try:
            journal = self.store.read_journal(model)
            target = to or journal.get("previous", "")
            if not target:
                older = [v for v in self.store.installed(model) if v != self.store.active_version(model)]
                target = older[-1] if older else ""
            if not target:
                raise UpdateRefused(f"{model} has no earlier installed version to roll back to")
            if target not in self.store.installed(model):
                raise UpdateRefused(
                    f"{model} {target} is not installed; installed: {', '.join(self.store.installed(model)) or 'none'}"
                )
            self._rollback(model, journal, reason, to=target)
            return target
        finally:
            lock.release()

    def _rollback(self, model: str, journal: dict[str, Any], reason: str, to: str) -> None:
        bad = self.store.active_version(model) or journal.get("target", "")
        if not to:
            self._enter(model, "failed", journal, f"{reason}; no previous version to roll back to")
            return
        path = self.store.version_dir(model, to)
        bundle = open_bundle(path)
        loaded = LoadedModel.load(bundle, self.registry.options_for(bundle.manifest.runtime), self.config.warmup_runs)
        self.registry.adopt(loaded, path)
        self._mark_rolled_back(model, journal, bad, to)
        self.store.activate(model, to)
        self._enter(model, "rolled_back", journal, f"{bad} rolled back to {to}: {reason}")
        self.m_rollbacks.labels(model).inc()

    def _rollback_on_disk(self, model: str, journal: dict[str, Any], reason: str) -> None:
        """At start-up, before anything loads: move the link back."""
        bad, to = journal.get("target", ""), journal["previous"]
        self._mark_rolled_back(model, journal, bad, to)
        self.store.activate(model, to)
        journal.update(state="rolled_back", reason=f"{bad} rolled back to {to}: {reason}")
        self.m_rollbacks.labels(model).inc()

    @staticmethod
    def _mark_rolled_back(model: str, journal: dict[str, Any], bad: str, to: str) -> None:
        """Remember the bad release so its retained message does not re-apply it."""
        if journal.get("target") == bad and journal.get("sha256"):
            key = f"{bad}:{journal['sha256']}:{journal.get('published_at', 0.0)}"
            journal.setdefault("refused", {})[key] = "rolled back"
        journal.update(target=to, previous="")

