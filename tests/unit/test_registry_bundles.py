"""The registry and unusable bundles (issue 15, defects 4, 5 and 9): an archive
bomb or a bundle with unlisted files never serves and is listed with its reason;
unknown names leave no state behind."""

from __future__ import annotations

import pytest

import edged.bundle as bundle_module
from edged.bundle import pack_bundle
from edged.config import Config
from edged.dataplane import DataPlane
from edged.errors import ModelNotFound, ModelNotReady
from edged.metrics import Metrics
from edged.registry import NAME_LOCKS, ModelRegistry
from tests.bombs import make_bomb as _bomb
from tests.unit.tiny_model import write_tiny_bundle


@pytest.fixture()
def plane(tmp_path):
    models = tmp_path / "models"
    write_tiny_bundle(models / "tiny")
    extra = write_tiny_bundle(tmp_path / "extra-src", name="extra")
    (extra.root / "payload.sh").write_text("#!/bin/sh\n")
    pack_bundle(extra.root, models / "extra-1.0.0.tar.gz")
    bomb = _bomb(tmp_path, 64 * 2**20)
    bomb.rename(models / "bomb.tar.gz")
    (models / "junk").mkdir()
    (models / "junk" / "manifest.json").write_text("{not json")
    config = Config(models_dir=str(models), state_dir=str(tmp_path / "state"))
    metrics = Metrics()
    dataplane = DataPlane(config, ModelRegistry(config, metrics), metrics)
    dataplane.start()
    yield dataplane
    dataplane.stop()


def test_unusable_bundles_are_listed_with_their_reason(plane):
    rows = {row["name"]: row for row in plane.repository_index()}
    assert rows["tiny"]["state"] == "READY"
    assert rows["extra"]["state"] == "FAILED" and "not listed in the manifest: payload.sh" in rows["extra"]["reason"]
    assert rows["bomb"]["state"] == "FAILED" and "archive bomb" in rows["bomb"]["reason"]
    assert rows["junk"]["state"] == "FAILED" and "not valid JSON" in rows["junk"]["reason"]
    for name, words in (("bomb", "archive bomb"), ("extra", "payload.sh"), ("junk", "not valid JSON")):
        meta = plane.model_metadata(name)
        assert meta["state"] == "FAILED" and words in meta["reason"], meta
    with pytest.raises(ModelNotReady, match="archive bomb"):
        plane.registry.get("bomb").acquire()
    with pytest.raises(ModelNotReady, match="archive bomb"):
        plane.load_model("bomb")


def test_a_refused_archive_is_not_unpacked_again(plane, monkeypatch):
    calls = []
    real = bundle_module.safe_extract
    monkeypatch.setattr(bundle_module, "safe_extract", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(3):
        rows = {row["name"]: row for row in plane.repository_index()}
        assert "archive bomb" in rows["bomb"]["reason"]
    assert calls == []


def test_unknown_names_keep_no_state(plane):
    """5,000 loads of unique unknown names added 37.5 MB: a lock per name was made
    before the name was checked."""
    registry = plane.registry
    for i in range(2000):
        with pytest.raises(ModelNotFound):
            plane.load_model(f"nope-{i}")
        with pytest.raises(ModelNotFound):
            plane.unload_model(f"gone-{i}")
    assert len(registry._name_locks) == NAME_LOCKS
    assert {e.name for e in registry.index()} == {"tiny", "extra", "bomb", "junk"}
