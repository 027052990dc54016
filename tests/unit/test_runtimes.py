import subprocess
import sys

import numpy as np
import pytest

from edged.bundle import open_bundle
from edged.errors import BundleError, InvalidInput, RuntimeUnavailable
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions, create_runtime, runtime_versions
from tests.unit.tiny_model import write_tiny_bundle

HIDE_LITERT = (
    "import sys\n"
    "for name in ('ai_edge_litert', 'tflite_runtime', 'tensorflow'):\n"
    "    sys.modules[name] = None  # as if not installed\n"
)


def test_missing_library_is_a_clear_error_not_an_import_crash():
    code = HIDE_LITERT + (
        "import edged.cli, edged.daemon\n"
        "from edged.runtimes import create_runtime, runtime_versions\n"
        "from edged.errors import RuntimeUnavailable\n"
        "assert runtime_versions()['tflite'] is None\n"
        "try:\n"
        "    create_runtime('tflite')\n"
        "except RuntimeUnavailable as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "runtime tflite is not installed: pip install 'edged[tflite]'" in out.stdout


def test_unknown_runtime():
    with pytest.raises(RuntimeUnavailable, match="unknown runtime 'tensorrt'"):
        create_runtime("tensorrt")


def test_installed_runtimes_report_versions():
    versions = runtime_versions()
    assert versions["onnx"].startswith("onnxruntime ")


def test_manifest_that_disagrees_with_model_is_refused(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    manifest = bundle.manifest
    manifest.inputs = [type(manifest.inputs[0])("input", "float32", (-1, 5), "NC")]
    with pytest.raises(BundleError, match=r"input.*\[-1, 5\].*\[-1, 4\]"):
        LoadedModel.load(bundle, RuntimeOptions())


def test_input_validation_names_tensor(tmp_path):
    model = LoadedModel.load(open_bundle(write_tiny_bundle(tmp_path / "tiny").root), RuntimeOptions(threads=1))
    with pytest.raises(InvalidInput, match="input input: expected dtype float32, got int64"):
        model.infer({"input": np.ones((1, 4), np.int64)})
    with pytest.raises(InvalidInput, match="missing input tensor"):
        model.infer({})
