"""OTA over a real flaky link: the bundle server runs in a network namespace
behind a veth pair shaped to 2 Mbit/s with `tc tbf`, and the test takes the link
down in the middle of the download. The device must resume with Range and finish.

Needs root and iproute2 (`ip`, `tc`); `make test` runs as root on the CI machine.
(`tc netem` loss and delay would be closer to a factory network, but this
kernel has no sch_netem module, so link drops stand in for loss.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from edged.ota.message import device_topic
from tests.e2e.test_ota import MODEL, clear_retained, ota_status, publish, served_version, start_device, wait_for
from tests.helpers import DEMO_BUNDLES, REPO, end_process_group
from tests.ota_release import make_big_release, make_keys, message_for, pack

pytestmark = pytest.mark.slow


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture()
def namespace():
    """A network namespace with the server side of a 2 Mbit/s veth link: yields
    (namespace, host veth, server address)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root and iproute2 (ip, tc) to create a network namespace")
    tag = os.getpid() % 100000
    ns, host_if, ns_if = f"edged-ota-{tag}", f"eo{tag}h", f"eo{tag}n"
    net = 10 + tag % 200
    try:
        _run("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"10.231.{net}.1/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        # While the link is down its connected route goes away: this blackhole keeps
        # the test's traffic from ever following the default route off the machine.
        _run("ip", "route", "add", "blackhole", f"10.231.{net}.0/30", "metric", "4000")
        _run("ip", "-n", ns, "addr", "add", f"10.231.{net}.2/30", "dev", ns_if)
        _run("ip", "-n", ns, "link", "set", ns_if, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_if, "root", "tbf",
             "rate", "2mbit", "burst", "32kbit", "latency", "200ms")
        yield ns, host_if, f"10.231.{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "route", "del", "blackhole", f"10.231.{net}.0/30", "metric", "4000"], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_download_survives_a_link_drop(tmp_path, namespace, mqtt_broker):
    ns, host_if, address = namespace
    keys = make_keys(tmp_path / "keys")
    v1 = make_big_release(DEMO_BUNDLES / "digits-onnx", tmp_path / "rel", MODEL, "1.0.0", keys.private, megabytes=0.1)
    v2 = make_big_release(DEMO_BUNDLES / "digits-onnx", tmp_path / "rel", MODEL, "2.0.0", keys.private, megabytes=1.2)
    archive = pack(v2, tmp_path / "served")
    device = start_device(tmp_path / "dev", "dev-n", mqtt_broker.port, keys.trusted_dir, [], v1,
                          extra_ota="download_timeout_s = 1\ndownload_retries = 12\n")
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "edged.cli", "fleet", "serve", str(tmp_path / "served"),
         "--host", address, "--port", "8000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
    )
    topic = device_topic("edged", "dev-n", MODEL)
    try:
        wait_for(lambda: _listening(address, 8000), 60, "the bundle server in the namespace")
        publish(mqtt_broker.port, topic, message_for(archive, f"http://{address}:8000/", v2))
        wait_for(lambda: ota_status(device).get("progress", {}).get("bytes", 0) > 100_000, 60, "download under way")
        _run("ip", "link", "set", host_if, "down")  # the link drops mid-transfer...
        time.sleep(2.5)
        _run("ip", "link", "set", host_if, "up")  # ...and comes back
        wait_for(lambda: served_version(device) == "2.0.0", 90, "v2 after the link came back")
        journal = json.loads((tmp_path / "dev" / "state" / "store" / MODEL / "journal.json").read_text())
        assert journal["download_resumed_from"], journal  # resumed with Range, not restarted from zero
        assert 0 < journal["download_resumed_from"][0] < archive.stat().st_size
    finally:
        device.stop()
        end_process_group(server)
        clear_retained(mqtt_broker.port, topic)
