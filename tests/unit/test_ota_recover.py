"""Updater.recover(): what start-up makes of a journal left in 'watching'."""

from __future__ import annotations

import logging
import time

from edged.config import Config, OtaConfig
from edged.metrics import Metrics
from edged.ota.updater import Updater
from edged.registry import ModelRegistry


def _updater(tmp_path, swapped_ago_s: float) -> Updater:
    config = Config(models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"),
                    ota=OtaConfig(enabled=True, health_window_s=5))
    (tmp_path / "models").mkdir()
    updater = Updater(config, ModelRegistry(config, Metrics()), Metrics())
    updater.store.write_journal("m", {"state": "watching", "target": "2.0.0", "previous": "1.0.0",
                                      "swapped_at": time.time() - swapped_ago_s, "boots": 0, "clean_stop": False})
    return updater


def test_health_window_that_ended_while_down_makes_the_version_active(tmp_path, caplog):
    """A power cut while watching, and a boot that took longer than the window: the
    version is active, and the log says so in the line a live watch ends with."""
    updater = _updater(tmp_path, swapped_ago_s=60)
    with caplog.at_level(logging.INFO, logger="edged.ota.updater"):
        notes = updater.recover()
    assert updater.store.read_journal("m")["state"] == "active"
    assert updater.status()["models"]["m"]["state"] == "active"
    assert any("passed its health window" in note for note in notes), notes
    assert "OTA m: active" in caplog.text


def test_unclean_restart_inside_the_window_keeps_watching_and_counts_it(tmp_path):
    updater = _updater(tmp_path, swapped_ago_s=0)
    notes = updater.recover()
    journal = updater.store.read_journal("m")
    assert journal["state"] == "watching" and journal["boots"] == 1
    assert any("still inside its health window" in note for note in notes), notes
