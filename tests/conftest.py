"""Session fixtures: the demo bundles (built once by the real script)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import DEMO_BUNDLES, DEMO_DATA, REPO


@pytest.fixture(scope="session")
def demo_bundles():
    """Build (or reuse) the three demo bundles with scripts/build_demo.py."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_demo.py"), "--out", str(DEMO_BUNDLES)],
        check=True, cwd=REPO,
    )
    return DEMO_BUNDLES


@pytest.fixture(scope="session")
def demo_data(demo_bundles):
    return DEMO_DATA
