"""Memory-related runtime behaviour: onnxruntime's memory arena option, and the
heap trim the daemon runs after loading models."""

from __future__ import annotations

import numpy as np
import pytest

from edged.daemon import trim_heap
from edged.errors import ConfigError
from edged.runtimes import RuntimeOptions, create_runtime
from tests.helpers import DEMO_BUNDLES

ONNX_MODEL = DEMO_BUNDLES / "digits-onnx" / "model.onnx"


def _onnx(demo_bundles, **extra):
    pytest.importorskip("onnxruntime")
    runtime = create_runtime("onnx")
    runtime.load(str(ONNX_MODEL), RuntimeOptions(threads=1, extra=extra))
    return runtime


def test_onnx_memory_arena_is_on_by_default_and_can_be_turned_off(demo_bundles):
    default = _onnx(demo_bundles)
    lean = _onnx(demo_bundles, cpu_mem_arena=False)
    assert default._session.get_session_options().enable_cpu_mem_arena is True
    assert lean._session.get_session_options().enable_cpu_mem_arena is False
    with np.load(DEMO_BUNDLES / "digits-onnx" / "samples.npz") as data:
        x = data["input:input"][:4]
    np.testing.assert_array_equal(default.infer({"input": x})["logits"], lean.infer({"input": x})["logits"])


def test_onnx_memory_arena_must_be_a_bool(demo_bundles):
    with pytest.raises(ConfigError, match="runtime_options.onnx.cpu_mem_arena must be true or false, got 'no'"):
        _onnx(demo_bundles, cpu_mem_arena="no")


def test_trim_heap_runs_on_glibc():
    # glibc provides malloc_trim; this test machine runs glibc (Debian).
    assert trim_heap() is True
