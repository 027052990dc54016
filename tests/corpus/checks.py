"""fp32 sanity checks: each corpus model, run sample by sample on its generated data, gives
sensible and non-degenerate outputs (text pixels on text, speech on speech, faces on faces...).

``check(name, n, seed)`` returns a ``CheckResult``: the numbers measured and the failed
conditions (empty when the model behaves).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np

from tests.corpus.data import make_data_with_meta
from tests.corpus.fetch import read_wheel_text
from tests.corpus.models import CorpusModel, get
from tests.corpus.runtime import Runner, run_all


@dataclass
class CheckResult:
    name: str
    numbers: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)

    def line(self) -> str:
        nums = ", ".join(f"{k}={v:.4g}" for k, v in self.numbers.items())
        verdict = "ok" if self.ok else "FAIL: " + "; ".join(self.failures)
        return f"{self.name}: {verdict} ({nums})"


def _ctc_decode(ids: np.ndarray, charset: list[str]) -> str:
    keep = np.r_[True, ids[1:] != ids[:-1]] & (ids != 0)
    return "".join(charset[int(i)] for i in ids[keep])


def _common(res: CheckResult, outs: list[np.ndarray]) -> None:
    for k, out in enumerate(outs):
        res.expect(bool(np.isfinite(out.astype(np.float64)).all()), f"output {k} has NaN/Inf")
        per_sample = out.reshape(out.shape[0], -1).astype(np.float64)
        res.numbers[f"out{k}_spread"] = float(per_sample.std(axis=0).mean())
        res.expect(float(np.ptp(per_sample, axis=0).max()) > 0, f"output {k} is the same for every sample")


def _check_det_map(res, outs, meta):
    prob = outs[0][:, 0, 0]
    frac = (prob > 0.3).reshape(len(prob), -1).mean(axis=1)
    text, blank = frac[meta["has_text"]], frac[~meta["has_text"]]
    res.numbers.update(text_px_on_pages=float(text.mean()), text_px_on_blank=float(blank.mean()) if len(blank) else 0.0)
    res.expect(float(text.min()) > 0.005, "some text page has almost no text pixels")
    res.expect(len(blank) == 0 or float(blank.max()) < 0.002, "a page without text has text pixels")


def _check_cls(res, outs, meta, feeds):
    probs = outs[0][:, 0]
    acc = float((probs.argmax(-1) == feeds["y"]).mean())
    res.numbers.update(accuracy=acc, p180_mean=float(probs[:, 1].mean()))
    res.expect(acc >= 0.85, f"orientation accuracy {acc:.2f} < 0.85")


def _check_ppocr_rec(res, outs, meta, model):
    sess_meta = Runner(model.path())._sess.get_modelmeta().custom_metadata_map
    charset = ["blank"] + sess_meta["character"].splitlines() + [" "]
    texts = [_ctc_decode(o[0].argmax(-1), charset) for o in outs[0]]
    exact = float(np.mean([t.strip() == s for t, s in zip(texts, meta["text"])]))
    res.numbers.update(exact_match=exact)
    res.expect(exact >= 0.5, f"only {exact:.0%} of the rendered lines read back")


def _dddd_charset(model: CorpusModel) -> list[str]:
    src = read_wheel_text(model.package, model.version, "ddddocr/__init__.py")
    sets = [ast.literal_eval(node.value) for node in ast.walk(ast.parse(src))
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and len(node.value.elts) > 100
            and any(isinstance(t, ast.Attribute) and t.attr == "__charset" for t in node.targets)]
    # ddddocr's __init__: the first list is common_old.onnx's charset, the second common.onnx's
    return sets[0] if model.member.endswith("common_old.onnx") else sets[1]


def _check_dddd_ocr(res, outs, meta, model):
    charset = _dddd_charset(model)
    texts = [_ctc_decode(o[0], charset) for o in outs[0]]
    exact = float(np.mean([t.lower() == s.lower() for t, s in zip(texts, meta["text"])]))
    res.numbers.update(exact_match_nocase=exact)
    res.expect(exact >= 0.5, f"only {exact:.0%} of the captchas read back")


def _check_dddd_det(res, outs, meta):
    y = outs[0][:, 0]
    score = (y[..., 4] * y[..., 5]).max(axis=1)
    has = meta["chars"] > 0
    res.numbers.update(max_score_chars=float(score[has].mean()),
                       max_score_empty=float(score[~has].mean()) if (~has).any() else 0.0)
    res.expect(float(score[has].min()) > 0.5, "a scene with characters has no detection > 0.5")
    res.expect(not (~has).any() or float(score[~has].max()) < float(score[has].min()),
               "empty scenes score as high as scenes with characters")


def _check_face(res, outs, meta):
    logits = outs[1][:, 0, :, 0].astype(np.float64)
    score = (1 / (1 + np.exp(-np.clip(logits, -80, 80)))).max(axis=1)
    face = meta["face"]
    res.numbers.update(max_score_faces=float(score[face].mean()),
                       max_score_no_face=float(score[~face].mean()) if (~face).any() else 0.0)
    res.expect(float(score[face].min()) > 0.5, "a drawn face scores <= 0.5")
    res.expect(not (~face).any() or float(score[~face].max()) < 0.5, "a scene without a face scores > 0.5")


def _check_selfie(res, outs, meta):
    mask = outs[0][:, 0, :, :, 0] > 0.5
    frac = mask.reshape(len(mask), -1).mean(axis=1)
    person = meta["person"]
    found = float((frac[person] > 0.05).mean())
    res.numbers.update(person_px_portraits=float(frac[person].mean()), portraits_found=found,
                       person_px_no_person=float(frac[~person].mean()) if (~person).any() else 0.0)
    res.expect(found >= 0.6, f"only {found:.0%} of the drawn portraits are segmented")
    res.expect(not (~person).any() or float(frac[~person].max()) < 0.02, "a scene without a person is segmented")


def _check_vad(res, outs, meta):
    prob = outs[0].reshape(len(outs[0]), -1)[:, 0]
    sp = meta["speech"]
    res.numbers.update(p_speech=float(prob[sp].mean()), p_silence=float(prob[~sp].mean()),
                       speech_chunks=float(sp.sum()), silence_chunks=float((~sp).sum()))
    res.expect(sp.any() and (~sp).any(), "data lacks speech or silence chunks")
    if sp.any() and (~sp).any():
        res.expect(float(prob[sp].mean()) > float(prob[~sp].mean()) + 0.3,
                   "speech is not clearly more probable than silence")


def _check_melspec(res, outs, meta):
    spec = outs[0].reshape(len(outs[0]), -1, 32)
    level = spec.mean(axis=(1, 2))
    corr = float(np.corrcoef(level, meta["speech_fraction"])[0, 1])
    res.numbers.update(mel_min=float(spec.min()), mel_max=float(spec.max()), level_vs_speech_corr=corr)
    res.expect(corr > 0.5, f"spectrogram level does not follow the amount of speech (corr {corr:.2f})")


def _check_embedding(res, outs, meta):
    emb = outs[0].reshape(len(outs[0]), -1)
    norm = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9)
    cos = norm @ norm.T
    off = cos[~np.eye(len(cos), dtype=bool)]
    res.numbers.update(mean_pairwise_cos=float(off.mean()), emb_std=float(emb.std()))
    res.expect(float(off.mean()) < 0.99, "embeddings are all the same direction")


def check(model: CorpusModel | str, n: int = 16, seed: int = 0) -> CheckResult:
    """Run ``model`` in fp32 on ``n`` generated samples and judge its outputs."""
    model = get(model) if isinstance(model, str) else model
    feeds, meta = make_data_with_meta(model, n, seed)
    outs = run_all(Runner(model.path()), feeds)
    res = CheckResult(model.name)
    _common(res, outs)
    kind = model.data
    if kind == "ppocr_det":
        _check_det_map(res, outs, meta)
    elif kind == "ppocr_cls":
        _check_cls(res, outs, meta, feeds)
    elif kind == "ppocr_rec":
        _check_ppocr_rec(res, outs, meta, model)
    elif kind == "dddd_ocr":
        _check_dddd_ocr(res, outs, meta, model)
    elif kind == "dddd_det":
        _check_dddd_det(res, outs, meta)
    elif kind == "face_detect":
        _check_face(res, outs, meta)
    elif kind == "selfie_segment":
        _check_selfie(res, outs, meta)
    elif kind in ("silero_vad", "silero_vad_v4"):
        _check_vad(res, outs, meta)
    elif kind == "oww_melspec":
        _check_melspec(res, outs, meta)
    elif kind == "oww_embedding":
        _check_embedding(res, outs, meta)
    return res
