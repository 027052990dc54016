"""Build signed OTA releases from the demo bundles (used by the OTA tests and
the "ota" benchmark): rename/re-version a bundle, optionally spoil its
samples, sign its manifest, pack it, and describe it as an OTA message."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edged.bundle import MANIFEST, SAMPLES, open_bundle, pack_bundle, sha256_file, write_bundle
from edged.ota.message import OtaMessage, Rollout
from edged.signing import generate_keypair, load_private_key, sign_bundle_dir


@dataclass
class Keys:
    private: Path
    trusted_dir: Path
    key_id: str


# key id -> private key file of every pair make_keys wrote in this process, so that
# message_for signs an intent with the key that signed the release's bundle.
_PRIVATE_KEYS: dict[str, Path] = {}


def make_keys(directory: Path, name: str = "fleet") -> Keys:
    """A key pair; the public key alone sits in ``directory/trusted`` (a device's trust dir)."""
    trusted = directory / f"trusted-{name}"
    key_id = generate_keypair(directory / f"{name}.key", trusted / f"{name}.pub")
    _PRIVATE_KEYS[key_id] = directory / f"{name}.key"
    return Keys(private=directory / f"{name}.key", trusted_dir=trusted, key_id=key_id)


def make_release(
    source: Path, dest_dir: Path, name: str, version: str, key: Path | None,
    spoil_samples: bool = False, model_file: Path | None = None,
) -> Path:
    """Write ``dest_dir/{name}-{version}/`` from the bundle at ``source`` with a new
    name and version, signed with ``key`` (unsigned when None). With
    ``spoil_samples`` the expected outputs are wrong, so the self-test fails."""
    bundle = open_bundle(source)
    manifest = bundle.manifest
    manifest.name, manifest.version = name, version
    inputs, outputs = bundle.load_samples()
    if spoil_samples:
        outputs = {k: (v + 10.0).astype(v.dtype) if v.dtype.kind == "f" else (v ^ 0x55) for k, v in outputs.items()}
    files = {rel: bundle.root / rel for rel in manifest.files if rel not in (SAMPLES, MANIFEST)}
    if model_file is not None:
        files[manifest.model_file] = model_file
    root = dest_dir / f"{name}-{version}"
    write_bundle(root, manifest, files, inputs, outputs)
    if key is not None:
        sign_bundle_dir(root, load_private_key(key))
    return root


def pack(root: Path, serve_dir: Path) -> Path:
    serve_dir.mkdir(parents=True, exist_ok=True)
    return pack_bundle(root, serve_dir / f"{root.name}.tar.gz")


def message_for(archive: Path, base_url: str, root: Path, devices: list[str] | None = None,
                canary: float = 100.0, allow_downgrade: bool = False, key: Path | None = None) -> OtaMessage:
    """The OTA message for a packed release, its intent signed with ``key`` (default:
    the private key that signed the bundle, when make_keys made it; else unsigned)."""
    from edged.signing import read_signature

    manifest = open_bundle(root, verify=False).manifest
    bundle_signature = read_signature(root)
    message = OtaMessage(
        model=manifest.name, version=manifest.version, url=f"{base_url.rstrip('/')}/{archive.name}",
        sha256=sha256_file(archive), size=archive.stat().st_size, signature=bundle_signature,
        rollout=Rollout(devices=list(devices or []), canary_percent=canary),
        allow_downgrade=allow_downgrade, published_at=time.time(),
    )
    if key is None and bundle_signature is not None:
        key = _PRIVATE_KEYS.get(bundle_signature.key_id)
    return message.sign(load_private_key(key)) if key is not None else message


def expected_outputs(root: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the bundle's model returns for ``x`` (run in this process, real runtime)."""
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    model = LoadedModel.load(open_bundle(root), RuntimeOptions(threads=1), warmup=0)
    try:
        return model.infer({next(iter(model.inputs)): x})
    finally:
        model.unload()


def make_faulty_release(source: Path, dest_dir: Path, name: str, version: str, key: Path) -> Path:
    """A release whose model passes its self-test but fails at run time on other
    inputs: logits = table[max(pixel)], so a pixel above 16 makes onnxruntime's
    Gather raise (index out of bounds). Same input/output tensors as ``source``."""
    from onnx import TensorProto, helper

    table = np.random.default_rng(3).normal(size=(17, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("ReduceMax", ["flat", "axes"], ["peak"], keepdims=0),
        helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["logits"], axis=0),
    ]
    initializers = [
        helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("table", TensorProto.FLOAT, table.shape, table.ravel().tolist()),
    ]
    return make_onnx_release(nodes, initializers, source, dest_dir, name, version, key)


def make_big_release(source: Path, dest_dir: Path, name: str, version: str, key: Path, megabytes: float = 10.0) -> Path:
    """A digits-shaped ONNX release of about ``megabytes`` (random dense weights):
    logits = relu(x @ W1) @ W2. Different versions get different weights."""
    from onnx import numpy_helper, helper

    seed = sum(int(p) * 1000**i for i, p in enumerate(reversed(version.split("-")[0].split("."))))
    rng = np.random.default_rng(seed)
    hidden = max(16, int(megabytes * 2**20 / 4 / (64 + 10)))
    w1 = (rng.normal(size=(64, hidden)) / 8).astype(np.float32)
    w2 = (rng.normal(size=(hidden, 10)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
    ]
    return make_onnx_release(nodes, initializers, source, dest_dir, name, version, key)


def make_onnx_release(nodes: list, initializers: list, source: Path, dest_dir: Path, name: str,
                      version: str, key: Path | None) -> Path:
    """A signed release of a hand-built ONNX graph with ``source``'s tensors; the
    expected sample outputs come from running it with onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    dest_dir.mkdir(parents=True, exist_ok=True)
    model_path = dest_dir / f"{name}-{version}.onnx"
    onnx.save(model, model_path)
    bundle = open_bundle(source)
    manifest = bundle.manifest
    manifest.name, manifest.version, manifest.runtime, manifest.model_file = name, version, "onnx", "model.onnx"
    manifest.validation = {}
    inputs, _ = bundle.load_samples()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = {"logits": session.run(["logits"], {"input": inputs["input"]})[0]}
    root = dest_dir / f"{name}-{version}"
    write_bundle(root, manifest, {"model.onnx": model_path}, inputs, outputs)
    if key is not None:
        sign_bundle_dir(root, load_private_key(key))
    return root
