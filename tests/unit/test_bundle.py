import io
import tarfile

import numpy as np
import pytest

from edged.bundle import ExtractLimits, Manifest, open_bundle, pack_bundle, safe_extract, semver_key, write_bundle
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


# -- archive bombs, unlisted files, symlinks (issue 15, defects 4 and 8) -------------
from tests.bombs import make_bomb as _bomb  # noqa: E402


def _bytes_under(root):
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_archive_bomb_is_refused_by_ratio_while_extracting(tmp_path):
    archive = _bomb(tmp_path, 64 * 2**20)
    assert archive.stat().st_size < 2**20  # 64 MiB of zeros in well under 1 MiB
    limits = ExtractLimits()
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match="archive bomb"):
        safe_extract(archive, dest, limits)
    assert _bytes_under(dest) <= limits.budget(archive.stat().st_size)  # stopped at the limit, not after
    with pytest.raises(BundleError, match="archive bomb"):
        open_bundle(archive, tmp_path / "unpacked")
    assert not any((tmp_path / "unpacked").iterdir())  # nothing left behind


def test_absolute_unpacked_limit_and_member_count(tmp_path):
    archive = _bomb(tmp_path, 3 * 2**20)
    with pytest.raises(BundleError, match="more than 2097152 bytes"):
        safe_extract(archive, tmp_path / "a", ExtractLimits(max_bytes=2 * 2**20, max_ratio=1e9, ratio_floor=0))
    safe_extract(archive, tmp_path / "b", ExtractLimits(max_bytes=4 * 2**20, max_ratio=1e9))
    with pytest.raises(BundleError, match="more than 2 members"):
        safe_extract(archive, tmp_path / "c", ExtractLimits(max_members=2))


def test_unlisted_file_is_refused_on_every_open(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    (bundle.root / "extra.py").write_text("print('hi')")
    with pytest.raises(BundleError, match="not listed in the manifest: extra.py"):
        open_bundle(bundle.root)
    archive = pack_bundle(bundle.root, tmp_path / "tiny.tar.gz")
    with pytest.raises(BundleError, match="not listed in the manifest: extra.py"):
        open_bundle(archive, tmp_path / "unpacked")


def test_symlinked_sub_directory_is_refused(tmp_path):
    """Only the last component was checked: a listed sub/model.onnx read through a
    symlinked sub/ escaped the bundle."""
    source = write_tiny_bundle(tmp_path / "src")
    manifest = source.manifest
    manifest.model_file = "sub/model.onnx"
    inputs, outputs = source.load_samples()
    bundle = write_bundle(tmp_path / "b", manifest, {"sub/model.onnx": source.root / "model.onnx"}, inputs, outputs)
    open_bundle(bundle.root)  # fine as written
    outside = tmp_path / "outside"
    (bundle.root / "sub").rename(outside)
    (bundle.root / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="sub is a symlink"):
        open_bundle(bundle.root)


def test_symlinked_file_and_unlisted_symlink_are_refused(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "tiny")
    real = tmp_path / "samples-elsewhere.npz"
    (bundle.root / "samples.npz").rename(real)
    (bundle.root / "samples.npz").symlink_to(real)
    with pytest.raises(BundleError, match="samples.npz is a symlink"):
        open_bundle(bundle.root)
    other = write_tiny_bundle(tmp_path / "other")
    (other.root / "etc").symlink_to("/etc", target_is_directory=True)
    with pytest.raises(BundleError, match="not listed in the manifest: etc"):
        open_bundle(other.root)


@pytest.mark.parametrize("off_by, peak_fraction, passes", [
    (0.10, 0.0, False),  # an absolute tolerance from this CPU's error refuses another CPU's int8 rounding
    (0.10, 0.2, True),   # the int8 floor takes it
    (0.60, 0.2, False),  # a runtime that computes nonsense still fails
])
def test_self_test_peak_fraction_floor(tmp_path, off_by, peak_fraction, passes):
    bundle = write_tiny_bundle(tmp_path / "b", samples_off_by=off_by,
                               tolerance={"atol": 1e-3, "rtol": 0.0, "peak_fraction": peak_fraction})
    model = LoadedModel.load(open_bundle(bundle.root), RuntimeOptions(threads=1))
    try:
        assert (model.self_test() <= 1.0) is passes
    finally:
        model.unload()
