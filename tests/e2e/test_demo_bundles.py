"""The demo bundles record a real hw-profile: one that `edged profiles list` shows,
whose default output is the bundle's runtime."""

from __future__ import annotations

from edged.bundle import read_manifest
from edged.profiles import all_profiles
from tests.helpers import DEMO_MODELS


def test_demo_bundles_name_real_profiles(demo_bundles):
    profiles = all_profiles()
    for model in DEMO_MODELS:
        manifest = read_manifest(demo_bundles / model)
        assert manifest.hw_profile in profiles, (model, manifest.hw_profile, sorted(profiles))
        assert profiles[manifest.hw_profile].output == manifest.runtime, (model, manifest.hw_profile)
