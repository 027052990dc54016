"""A daemon loads only what its models need: the runtime of each configured
bundle and none of the others, and none of the command-line framework or the
converters. Each daemon runs the real `edged serve` path (``edged.cli.entry``)
in a child process that, once ready, records its ``sys.modules`` and the shared
libraries it has mapped, then stops itself with SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edged.cli.serve import ServeArgs, plain_serve_args
from tests.helpers import REPO, free_port

# Python modules and mapped library names (substrings) of each runtime.
RUNTIME_MODULES = {
    "onnx": ("onnxruntime",),
    "tflite": ("ai_edge_litert", "tflite_runtime", "tensorflow"),
    "openvino": ("openvino",),
}
RUNTIME_LIBRARIES = {
    "onnx": ("onnxruntime",),
    "tflite": ("ai_edge_litert", "tflite_runtime", "_pywrap_tensorflow"),
    "openvino": ("libopenvino",),
}
BUNDLE_RUNTIME = {"digits-onnx": "onnx", "digits-tflite": "tflite", "digits-openvino": "openvino"}
# Never needed to serve: the CLI framework (typer parses options through pydantic),
# the converters, and OpenVINO's model converter with its telemetry.
NOT_SERVING = ("typer", "rich", "pydantic", "click", "converters", "edged.cli.main",
               "openvino.tools.ovc", "openvino_telemetry")

CHILD = textwrap.dedent("""
    import http.client, json, os, signal, sys, threading, time

    port, out = int(sys.argv[1]), sys.argv[2]

    def watch():
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        maps = open("/proc/self/maps").read().splitlines()
        libs = sorted({line.split()[-1] for line in maps if ".so" in line})
        with open(out, "w") as handle:
            json.dump({"modules": sorted(sys.modules), "libraries": libs}, handle)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    sys.argv = ["edged", "serve", "--config", sys.argv[3]]
    from edged.cli import entry
    entry()
""")


def serve_and_inspect(tmp: Path, bundles: list[Path]) -> dict:
    """Serve ``bundles`` until ready; the child's modules and mapped libraries."""
    models = tmp / "models"
    models.mkdir(parents=True)
    for bundle in bundles:
        (models / bundle.name).symlink_to(bundle)
    port = free_port()
    config = tmp / "edged.toml"
    config.write_text(f'models_dir = "{models}"\nstate_dir = "{tmp / "state"}"\nthreads = 1\n'
                      f"[http]\nhost = \"127.0.0.1\"\nport = {port}\n")
    out = tmp / "loaded.json"
    done = subprocess.run([sys.executable, "-c", CHILD, str(port), str(out), str(config)],
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.exists(), "the daemon never became ready:\n" + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert f"{len(bundles)} model version(s) serving" in done.stderr, done.stderr[-3000:]
    return result


def loaded(result: dict, runtime: str) -> tuple[bool, bool]:
    """(a module of ``runtime`` imported, a library of ``runtime`` mapped)."""
    modules = any(m == name or m.startswith(name + ".") for m in result["modules"] for name in RUNTIME_MODULES[runtime])
    libraries = any(name in Path(lib).name or f"/{name}/" in lib for lib in result["libraries"]
                    for name in RUNTIME_LIBRARIES[runtime])
    return modules, libraries


@pytest.mark.parametrize("bundle", sorted(BUNDLE_RUNTIME))
def test_a_single_runtime_daemon_loads_no_other_runtime(demo_bundles, tmp_path, bundle):
    result = serve_and_inspect(tmp_path, [demo_bundles / bundle])
    wanted = BUNDLE_RUNTIME[bundle]
    assert loaded(result, wanted) == (True, True)
    for other in RUNTIME_MODULES:
        if other != wanted:
            assert loaded(result, other) == (False, False), f"{bundle} daemon loaded {other}"
    stray = [m for m in result["modules"] if any(m == n or m.startswith(n + ".") for n in NOT_SERVING)]
    assert stray == []


def test_three_runtimes_daemon_loads_no_cli_or_converter(demo_bundles, tmp_path):
    result = serve_and_inspect(tmp_path, [demo_bundles / name for name in sorted(BUNDLE_RUNTIME)])
    for runtime in RUNTIME_MODULES:
        assert loaded(result, runtime) == (True, True)
    stray = [m for m in result["modules"] if any(m == n or m.startswith(n + ".") for n in NOT_SERVING)]
    assert stray == []


def test_openvino_convert_model_still_works_after_the_runtime_imported_it(demo_bundles):
    """edged convert may load an OpenVINO bundle before it converts, in one process."""
    pytest.importorskip("openvino")
    code = textwrap.dedent(f"""
        import sys
        from edged.runtimes.openvino import import_openvino
        ov = import_openvino()
        assert "openvino.tools.ovc" not in sys.modules
        model = ov.convert_model({str(demo_bundles / "digits-onnx" / "model.onnx")!r})
        print([i.get_any_name() for i in model.inputs])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['input']"


@pytest.mark.parametrize("argv, expected", [
    (["serve"], ServeArgs(None)),
    (["serve", "--config", "a.toml"], ServeArgs(Path("a.toml"))),
    (["serve", "-c", "a.toml"], ServeArgs(Path("a.toml"))),
    (["serve", "--config=a.toml"], ServeArgs(Path("a.toml"))),
    (["serve", "--help"], None),
    (["serve", "--config"], None),
    (["serve", "--config", "--help"], None),
    (["serve", "a.toml"], None),
    (["serve", "--config", "a.toml", "--verbose"], None),
    (["doctor"], None),
    ([], None),
])
def test_plain_serve_command_lines_skip_typer_and_the_rest_go_to_it(argv, expected):
    assert plain_serve_args(argv, environ={}) == expected


def test_plain_serve_reads_edged_config_like_typer():
    assert plain_serve_args(["serve"], environ={"EDGED_CONFIG": "/etc/edged/edged.toml"}) == ServeArgs(
        Path("/etc/edged/edged.toml"))
    assert plain_serve_args(["serve"], environ={"EDGED_CONFIG": ""}) == ServeArgs(None)
    assert plain_serve_args(["serve", "-c", "x.toml"], environ={"EDGED_CONFIG": "y.toml"}) == ServeArgs(Path("x.toml"))
