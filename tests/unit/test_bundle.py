import io
import tarfile

import numpy as np
import pytest

from edged.bundle import Manifest, open_bundle, pack_bundle, semver_key
from edged.errors import BundleError
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions
from tests.unit.tiny_model import WEIGHTS, write_tiny_bundle


def test_written_bundle_verifies_and_loads(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    opened = open_bundle(bundle.root)
    assert set(opened.manifest.files) == {"model.onnx", "samples.npz"}
    model = LoadedModel.load(opened, RuntimeOptions(threads=1))
    x = np.ones((5, 4), np.float32)
    np.testing.assert_allclose(model.infer({"input": x})["y"], x @ WEIGHTS, rtol=1e-5)
    assert model.self_test() <= 1.0


def test_tampered_file_is_refused_naming_it(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    with open(bundle.root / "model.onnx", "r+b") as handle:
        handle.seek(20)
        handle.write(b"\x00\x01")
    with pytest.raises(BundleError, match="model.onnx"):
        open_bundle(bundle.root)


def test_missing_file_is_refused(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    (bundle.root / "samples.npz").unlink()
    with pytest.raises(BundleError, match="samples.npz"):
        open_bundle(bundle.root)


def test_archive_roundtrip(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    archive = pack_bundle(bundle.root, tmp_path / "tiny.tar.gz")
    opened = open_bundle(archive, tmp_path / "unpack")
    assert opened.manifest.name == "tiny"
    assert (opened.root / "model.onnx").is_file()


def _tar_with(tmp_path, member: tarfile.TarInfo, data: bytes = b"x"):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize(
    "name,kind,what",
    [
        ("../escape.txt", tarfile.REGTYPE, "escapes"),
        ("/etc/evil", tarfile.REGTYPE, "escapes"),
        ("a/../../evil", tarfile.REGTYPE, "escapes"),
        ("link", tarfile.SYMTYPE, "link or device"),
        ("hard", tarfile.LNKTYPE, "link or device"),
        ("dev", tarfile.CHRTYPE, "link or device"),
        ("fifo", tarfile.FIFOTYPE, "link or device"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, name, kind, what):
    member = tarfile.TarInfo(name)
    member.type = kind
    if kind == tarfile.REGTYPE:
        member.size = 1
    else:
        member.linkname = "/etc/passwd"
    archive = _tar_with(tmp_path, member)
    with pytest.raises(BundleError, match=what) as info:
        open_bundle(archive, tmp_path / "unpack")
    assert name.split("/")[-1] in str(info.value) or name in str(info.value)
    assert not (tmp_path / "escape.txt").exists()


def test_manifest_validation_names_the_problem():
    base = {
        "name": "m", "version": "1.0.0", "runtime": "onnx", "model_file": "model.onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}],
    }
    with pytest.raises(BundleError, match="not semver"):
        Manifest.from_dict({**base, "version": "v1"})
    with pytest.raises(BundleError, match="runtime 'tensorrt'"):
        Manifest.from_dict({**base, "runtime": "tensorrt"})
    with pytest.raises(BundleError, match="missing key 'inputs'"):
        Manifest.from_dict({k: v for k, v in base.items() if k != "inputs"})
    with pytest.raises(BundleError, match="escapes"):
        Manifest.from_dict({**base, "files": {"../x": {"sha256": "0", "size": 1}}})


def test_semver_ordering():
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.1", "0.9.9", "2.0.0"]
    assert sorted(versions, key=semver_key) == ["0.9.9", "1.2.0-rc.1", "1.2.0", "1.10.0", "2.0.0"]
