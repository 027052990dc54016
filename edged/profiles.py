"""Hardware profiles: one TOML file per target under hw-profiles/.

A profile says how to recognise the device, which runtimes it prefers (with
their options), the precision to convert to, and its latency and memory budget.
Profiles are validated on load: an unknown key or a bad value is an error that
names the file and the key.
"""

from __future__ import annotations

import os
import platform
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.errors import ConfigError

RUNTIMES = ("tflite", "onnx", "openvino")
PRECISIONS = ("int8", "fp16", "fp32")
AUTO = "auto"  # runtime.precision only: edged convert builds int8, fp16, fp32 and keeps the fastest that passes
_TOP_KEYS = {"name", "description", "detect", "runtime", "budget"}
_DETECT_KEYS = {"arch", "cpu_vendor", "cpu_part", "cpu_flags", "device_tree_model", "nv_tegra_release"}
_RUNTIME_KEYS = {"preference", "precision", "output", "fallback_precision", "tflite", "onnx", "openvino"}
_OPTION_KEYS = {
    "tflite": {"threads", "xnnpack"},
    "onnx": {"threads", "providers", "per_channel"},
    "openvino": {"threads", "device", "performance_hint"},
}
_BUDGET_KEYS = {"latency_ms", "memory_mb"}


class ProfileError(ConfigError):
    """A profile file is invalid, or no profile has that name."""

    code = "profile_invalid"


@dataclass
class Detect:
    arch: list[str] = field(default_factory=list)
    cpu_vendor: list[str] = field(default_factory=list)
    cpu_part: list[str] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)
    device_tree_model: list[str] = field(default_factory=list)
    nv_tegra_release: bool = False


@dataclass
class Profile:
    name: str
    description: str
    path: Path
    detect: Detect
    preference: list[str]
    precision: str
    output: str
    fallback_precision: str | None
    options: dict[str, dict[str, Any]]
    latency_ms: float
    memory_mb: int

    def runtime_options(self, runtime: str) -> dict[str, Any]:
        return dict(self.options.get(runtime, {}))


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, first match of a name wins."""
    dirs = []
    if os.environ.get("EDGED_PROFILES_DIR"):
        dirs.append(Path(os.environ["EDGED_PROFILES_DIR"]))
    dirs.append(Path(__file__).resolve().parent.parent / "hw-profiles")  # source checkout
    dirs.append(Path(sys.prefix) / "share" / "edged" / "hw-profiles")  # wheel install
    dirs.append(Path("/usr/share/edged/hw-profiles"))
    return [d for d in dirs if d.is_dir()]


def _check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ProfileError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


def _str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def load_profile(path: Path) -> Profile:
    """Read and validate one profile file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    src = str(path)
    _check_keys(data, _TOP_KEYS, src)
    name = data.get("name", path.stem)
    if name != path.stem:
        raise ProfileError(f"{src}: key name {name!r} must match the file name {path.stem!r}")
    detect_data = data.get("detect", {})
    _check_keys(detect_data, _DETECT_KEYS, f"{src} [detect]")
    detect = Detect(
        **{k: _str_list(v, f"{src} detect.{k}") for k, v in detect_data.items() if k != "nv_tegra_release"},
        nv_tegra_release=bool(detect_data.get("nv_tegra_release", False)),
    )
    runtime = data.get("runtime", {})
    _check_keys(runtime, _RUNTIME_KEYS, f"{src} [runtime]")
    preference = _str_list(runtime.get("preference", []), f"{src} runtime.preference")
    if not preference:
        raise ProfileError(f"{src}: key runtime.preference must list at least one runtime")
    for r in preference:
        if r not in RUNTIMES:
            raise ProfileError(f"{src}: key runtime.preference: unknown runtime {r!r}; known: {', '.join(RUNTIMES)}")
    precision = runtime.get("precision", "int8")
    if precision not in (*PRECISIONS, AUTO):
        raise ProfileError(f"{src}: key runtime.precision must be one of {', '.join((*PRECISIONS, AUTO))}, "
                           f"got {precision!r}")
    fallback = runtime.get("fallback_precision")
    if fallback is not None and fallback not in PRECISIONS:
        raise ProfileError(f"{src}: key runtime.fallback_precision must be one of {', '.join(PRECISIONS)}")
    output = runtime.get("output", preference[0])
    if output not in preference:
        raise ProfileError(f"{src}: key runtime.output {output!r} must be one of runtime.preference")
    options: dict[str, dict[str, Any]] = {}
    for r in RUNTIMES:
        if r in runtime:
            if not isinstance(runtime[r], dict):
                raise ProfileError(f"{src}: [runtime.{r}] must be a table")
            _check_keys(runtime[r], _OPTION_KEYS[r], f"{src} [runtime.{r}]")
            threads = runtime[r].get("threads", 0)
            if not isinstance(threads, int) or threads < 0:
                raise ProfileError(f"{src}: key runtime.{r}.threads must be a non-negative integer")
            options[r] = dict(runtime[r])
    budget = data.get("budget", {})
    _check_keys(budget, _BUDGET_KEYS, f"{src} [budget]")
    latency, memory = budget.get("latency_ms", 100), budget.get("memory_mb", 512)
    if not isinstance(latency, (int, float)) or latency <= 0:
        raise ProfileError(f"{src}: key budget.latency_ms must be a positive number")
    if not isinstance(memory, int) or memory <= 0:
        raise ProfileError(f"{src}: key budget.memory_mb must be a positive integer")
    return Profile(
        name=name, description=str(data.get("description", "")), path=path, detect=detect,
        preference=preference, precision=precision, output=output, fallback_precision=fallback,
        options=options, latency_ms=float(latency), memory_mb=memory,
    )


def all_profiles() -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    for directory in profile_dirs():
        for path in sorted(directory.glob("*.toml")):
            profiles.setdefault(path.stem, load_profile(path))
    return profiles


def get_profile(name: str) -> Profile:
    profiles = all_profiles()
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(profiles) or 'none'}")
    return profiles[name]


@dataclass
class MachineFacts:
    arch: str
    cpu_vendor: str
    cpu_parts: set[str]
    cpu_flags: set[str]
    device_tree_model: str
    nv_tegra_release: bool

    @classmethod
    def read(cls, root: Path = Path("/")) -> "MachineFacts":
        vendor, parts, flags = "", set(), set()
        try:
            for line in (root / "proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id":
                    vendor = value
                elif key == "CPU part":
                    parts.add(value.lower())
                elif key in ("flags", "Features"):
                    flags.update(value.split())
        except OSError:
            pass
        try:
            model = (root / "proc/device-tree/model").read_text(errors="replace").rstrip("\0\n")
        except OSError:
            model = ""
        return cls(
            arch=platform.machine(), cpu_vendor=vendor, cpu_parts=parts, cpu_flags=flags,
            device_tree_model=model, nv_tegra_release=(root / "etc/nv_tegra_release").exists(),
        )


def match_score(profile: Profile, facts: MachineFacts) -> int | None:
    """None when the profile does not fit; otherwise how many criteria matched
    (the most specific profile wins)."""
    d, score = profile.detect, 0
    checks: list[tuple[bool, bool]] = [
        (bool(d.arch), facts.arch in d.arch),
        (bool(d.cpu_vendor), facts.cpu_vendor in d.cpu_vendor),
        (bool(d.cpu_part), bool(facts.cpu_parts & {p.lower() for p in d.cpu_part})),
        (bool(d.cpu_flags), set(d.cpu_flags) <= facts.cpu_flags),
        (bool(d.device_tree_model), any(m in facts.device_tree_model for m in d.device_tree_model)),
        (d.nv_tegra_release, facts.nv_tegra_release),
    ]
    for applies, ok in checks:
        if applies:
            if not ok:
                return None
            score += 1
    return score


def detect(facts: MachineFacts | None = None) -> str:
    """The name of the best-matching profile for this machine."""
    facts = facts or MachineFacts.read()
    scored = [(s, name) for name, p in all_profiles().items() if (s := match_score(p, facts)) is not None]
    if not scored:
        raise ProfileError(f"no hw-profile matches this {facts.arch} machine")
    scored.sort(key=lambda item: (-item[0], item[1]))
    return scored[0][1]
