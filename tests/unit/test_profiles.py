from pathlib import Path

import pytest

from edged import profiles
from edged.profiles import MachineFacts, ProfileError, load_profile, match_score

REQUIRED = {"rpi4", "rpi5", "jetson-orin-nano", "intel-x86", "generic-x86", "generic-arm64"}


def test_shipped_profiles_load_and_validate():
    found = profiles.all_profiles()
    assert REQUIRED <= set(found)
    assert found["rpi4"].output == "tflite" and found["rpi4"].precision == "int8"
    assert found["jetson-orin-nano"].options["onnx"]["providers"][0] == "TensorrtExecutionProvider"
    assert found["intel-x86"].output == "openvino"
    assert found["generic-x86"].output == "onnx"


def facts(**kw):
    base = dict(arch="x86_64", cpu_vendor="", cpu_parts=set(), cpu_flags=set(), device_tree_model="", nv_tegra_release=False)
    base.update(kw)
    return MachineFacts(**base)


@pytest.mark.parametrize(
    "machine,expected",
    [
        (facts(arch="aarch64", cpu_parts={"0xd08"}, device_tree_model="Raspberry Pi 4 Model B Rev 1.4"), "rpi4"),
        (facts(arch="aarch64", cpu_parts={"0xd0b"}, device_tree_model="Raspberry Pi 5 Model B Rev 1.0"), "rpi5"),
        (facts(arch="aarch64", device_tree_model="NVIDIA Jetson Orin Nano Developer Kit", nv_tegra_release=True), "jetson-orin-nano"),
        (facts(arch="aarch64"), "generic-arm64"),
        (facts(cpu_vendor="GenuineIntel"), "intel-x86"),
        (facts(cpu_vendor="AuthenticAMD"), "generic-x86"),
    ],
)
def test_detection(machine, expected):
    assert profiles.detect(machine) == expected


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[runtime]\npreference = ["onnx"]\nprecison = "int8"\n')
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "precison" in str(info.value)


def test_bad_value_names_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[runtime]\npreference = ["tensorrt"]\n')
    with pytest.raises(ProfileError, match="runtime.preference: unknown runtime 'tensorrt'"):
        load_profile(path)


def test_unknown_profile_lists_known():
    with pytest.raises(ProfileError, match="unknown profile 'rpi9'.*rpi4"):
        profiles.get_profile("rpi9")


def test_score_needs_every_criterion():
    rpi4 = profiles.get_profile("rpi4")
    assert match_score(rpi4, facts(arch="aarch64", cpu_parts={"0xd08"})) is None
