"""Power cuts for `make test-vm`: qemu is killed with SIGKILL, never shut down, and booted again.

Run by tests/vm/test_vm.sh once edged serves as a systemd service in the VM. Two parts:

1. **Outbox.** With the broker down, a host client sends HTTP inference requests while edged
   writes each result to its outbox (``mqtt.publish_http_results``). The power is cut at a
   random moment, ``--cuts`` times, each followed by a boot, after which the outbox database
   must pass ``PRAGMA integrity_check``. Then mosquitto starts: every result whose HTTP 200 the
   client saw (edged answers only after the row is committed) must arrive, with the outputs
   the client got, in the order the client sent them.
2. **OTA.** For each update state, the update is held there (``EDGED_OTA_PAUSE_AT`` in a
   runtime drop-in, which a boot forgets) and the power cut. After the boot edged must have
   loaded the old version (the new one once the ``active`` link moved, from ``watching``), the
   active version must verify against its manifest, and the update must complete from the
   retained message.

The guest reaches the host's loopback as 10.0.2.2 (qemu user networking). Prints one line per
event and a JSON summary last; exits 1 naming what failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from edged.fleet import Broker, build_message, publish, serve  # noqa: E402
from tests.brokers import mosquitto  # noqa: E402
from tests.ota_release import make_keys, make_release, pack  # noqa: E402

MODEL = "digits-onnx"
DEVICE = "edged-vm"
HOST_FROM_GUEST = "10.0.2.2"
OTA_STATES = ["downloading", "verifying", "unpacking", "loading", "warming", "self_testing",
              "swapping", "persisting", "watching"]
GUEST_PY = "/opt/edged/venv/bin/python"
STORE_CHECK = f"""
import json
from pathlib import Path
from edged.bundle import open_bundle
store = Path("/var/lib/edged/store/{MODEL}")
out = {{"active": None, "leftovers": []}}
if (store / "active").is_symlink():
    out["active"] = open_bundle((store / "active").resolve()).manifest.version  # verifies every file's sha256
    out["leftovers"] = sorted(p.name for p in store.iterdir() if p.name.startswith("."))
print(json.dumps(out))
"""
OUTBOX_CHECK = """
import sqlite3
db = sqlite3.connect("file:/var/lib/edged/outbox.sqlite?mode=ro", uri=True)
print(db.execute("PRAGMA integrity_check").fetchone()[0], db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
"""


class Failure(Exception):
    pass


def log(message: str) -> None:
    print(f"[power {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Vm:
    """The running guest: qemu started from a saved command line, reached over ssh."""

    qemu_argv: list[str]
    ssh_argv: list[str]
    pidfile: Path
    http_port: int
    slow: int
    boots: int = 0

    def sh(self, command: str, timeout: float | None = None, check: bool = True) -> str:
        limit = timeout or 120 * self.slow
        try:
            done = subprocess.run([*self.ssh_argv, command], capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            raise Failure(f"guest command ran past {limit:.0f}s: {command[:120]}") from None
        if check and done.returncode != 0:
            raise Failure(f"guest command failed ({done.returncode}): {command[:120]}\n{done.stderr[-2000:]}")
        return done.stdout

    def python(self, code: str) -> str:
        return self.sh(f"{GUEST_PY} - <<'PY'\n{code}\nPY")

    def cut(self) -> None:
        """Pull the plug: SIGKILL to qemu, nothing flushed, no shutdown."""
        pid = int(self.pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)

    def boot(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        for _ in range(10):  # the forwarded ports may take a moment to be free again
            started = subprocess.run(self.qemu_argv, capture_output=True, text=True)
            if started.returncode == 0:
                break
            time.sleep(2)
        else:
            raise Failure(f"qemu did not start again: {started.stderr.strip()[-500:]}")
        self.boots += 1
        self.wait(self._ssh_ok, 300 * self.slow, "ssh after boot")
        self.wait(self.ready, 180 * self.slow, "edged ready after boot")

    def _ssh_ok(self) -> bool:
        try:
            return subprocess.run([*self.ssh_argv, "true"], capture_output=True, timeout=15 * self.slow).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout * self.slow)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (json.loads(data) if data else {})
        finally:
            conn.close()

    def ready(self) -> bool:
        try:
            return self.request("GET", f"/v2/models/{MODEL}/ready", timeout=3)[0] == 200
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def restart_edged(self, environment: str = "") -> None:
        """Restart the service; ``environment`` goes in a drop-in under /run, gone after a boot."""
        drop = "/run/systemd/system/edged.service.d"
        if environment:
            self.sh(f"mkdir -p {drop} && printf '[Service]\\nEnvironment={environment}\\n' > {drop}/power-test.conf")
        else:
            self.sh(f"rm -f {drop}/power-test.conf")
        self.sh("systemctl daemon-reload && systemctl restart edged")
        self.wait(self.ready, 180 * self.slow, "edged ready after restart")

    def wait(self, predicate, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise Failure(f"timed out after {timeout:.0f}s waiting for {what}")

    def journal(self) -> str:
        return self.sh("journalctl -b -u edged --no-pager -o cat", check=False)


def infer_body(request_id: str, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    image = rng.uniform(0.0, 16.0, size=(1, 1, 8, 8)).astype(np.float32)
    return {"id": request_id, "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                          "data": image.ravel().tolist()}]}, image


@dataclass
class Acked:
    """What the client saw answered with 200, in the order it sent the requests."""

    ids: list[str] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def send_until(vm: Vm, cutting: threading.Event, cut_no: int, acked: Acked, errors: list[str]) -> None:
    """Send requests without pause until the connection dies; before the cut that is an error."""
    rng = np.random.default_rng(cut_no)
    conn = http.client.HTTPConnection("127.0.0.1", vm.http_port, timeout=30 * vm.slow)
    n = 0
    while True:
        request_id = f"cut{cut_no}-{n}"
        body, _ = infer_body(request_id, rng)
        n += 1
        try:
            conn.request("POST", f"/v2/models/{MODEL}/infer", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            if not cutting.is_set():
                errors.append(f"{request_id}: connection failed before the cut: {exc!r}")
            return
        if resp.status != 200:
            errors.append(f"{request_id}: HTTP {resp.status} {data[:200]!r}")
            return
        answer = json.loads(data)
        acked.ids.append(request_id)
        acked.outputs[request_id] = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)


def outbox_cuts(vm: Vm, cuts: int, acked: Acked) -> None:
    """Cut the power ``cuts`` times while HTTP results go into the outbox (broker down)."""
    for cut_no in range(1, cuts + 1):
        cutting, errors = threading.Event(), []
        before = len(acked.ids)
        client = threading.Thread(target=send_until, args=(vm, cutting, cut_no, acked, errors), daemon=True)
        client.start()
        vm.wait(lambda: len(acked.ids) > before, 60 * vm.slow, "the first answer after the boot")
        time.sleep(random.uniform(0.5, 2.0 * vm.slow))
        cutting.set()
        vm.cut()
        client.join(60 * vm.slow)
        if client.is_alive():
            raise Failure(f"cut {cut_no}: the client still waits on a request to the dead VM")
        if errors:
            raise Failure(f"cut {cut_no}: requests failed while the VM was up: {errors[:3]}")
        vm.boot()
        integrity, rows = vm.python(OUTBOX_CHECK).split()
        if integrity != "ok":
            raise Failure(f"cut {cut_no}: outbox.sqlite integrity_check says {integrity}")
        log(f"cut {cut_no}/{cuts}: {len(acked.ids) - before} results acknowledged before the cut; "
            f"after the boot the outbox is intact with {rows} rows")


class Collector:
    """A subscriber to the device's results with a persistent session on the broker, made
    before the device first connects, so nothing the outbox drains can pass it by."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrived: dict[str, tuple[int, np.ndarray]] = {}
        self.order: list[int] = []
        self.duplicates = 0
        self.expected: list[str] = []
        self.done = threading.Event()

    def _client(self) -> mqtt.Client:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="power-cut-collector", protocol=mqtt.MQTTv5)
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 86400
        client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        return client

    def subscribe_once(self) -> None:
        """Make the session: subscribe at QoS 1, then disconnect (the broker keeps queueing)."""
        client = self._client()
        result, _ = client.subscribe(f"edged/{DEVICE}/result/{MODEL}", qos=1)
        client.loop_start()
        time.sleep(1.0)
        client.disconnect()
        client.loop_stop()
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"collector could not subscribe: {result}")

    def _on_message(self, _client, _userdata, msg) -> None:
        body = json.loads(msg.payload)  # a corrupt payload fails here
        request_id = body.get("id", "")
        if request_id in self.arrived:
            self.duplicates += 1
            return
        self.arrived[request_id] = (int(body["seq"]), np.asarray(body["outputs"][0]["data"], dtype=np.float32))
        self.order.append(int(body["seq"]))
        if all(i in self.arrived for i in self.expected):
            self.done.set()

    def collect(self, acked: Acked, timeout: float) -> dict:
        """Reconnect, let edged drain its outbox, check every acknowledged result arrived in order."""
        self.expected = list(acked.ids)
        client = self._client()
        client.loop_start()
        try:
            self.done.wait(timeout)
        finally:
            client.disconnect()
            client.loop_stop()
        missing = [i for i in acked.ids if i not in self.arrived]
        if missing:
            raise Failure(f"{len(missing)} of {len(acked.ids)} acknowledged results never arrived, e.g. {missing[:5]}")
        wrong = [i for i in acked.ids if not np.array_equal(self.arrived[i][1], acked.outputs[i])]
        if wrong:
            raise Failure(f"{len(wrong)} results arrived with other outputs than the client got, e.g. {wrong[:5]}")
        seqs = [self.arrived[i][0] for i in acked.ids]
        if seqs != sorted(seqs) or self.order != sorted(self.order):
            raise Failure("results arrived out of order")
        return {"acknowledged": len(acked.ids), "arrived": len(self.arrived), "duplicates": self.duplicates,
                "written_not_acknowledged": len(self.arrived) - len(acked.ids)}


def served_version(vm: Vm) -> str:
    status, meta = vm.request("GET", f"/v2/models/{MODEL}")
    return meta.get("parameters", {}).get("version", "") if status == 200 else ""


def reached(vm: Vm, marker: str) -> bool:
    """Whether the journal shows ``marker``; a refused update fails at once, with its reason."""
    journal = vm.journal()
    refused = [line for line in journal.splitlines()  # a replay of the previous release's message is fine
               if (("OTA message" in line and "refused" in line) or f"OTA {MODEL}: refused" in line)
               and "a replayed message is refused" not in line]
    if refused:
        raise Failure(f"the device refused the update: {refused[-1]}")
    return marker in journal


def ota_cuts(vm: Vm, work: Path, broker_port: int, bundle_port: int) -> list[dict]:
    """For each state: hold the update there, cut the power, boot, check, let it complete."""
    keys = make_keys(work, "fleet")
    vm.sh(f"install -d /etc/edged/trusted-keys && cat > /etc/edged/trusted-keys/fleet.pub <<'PUB'\n"
          f"{(keys.trusted_dir / 'fleet.pub').read_text()}PUB\nsync")  # on disk before the first cut
    vm.restart_edged()
    site = work / "site"
    broker = Broker(port=broker_port)
    topic = f"edged/{DEVICE}/ota/update/{MODEL}"
    results = []
    current = served_version(vm)
    for number, state in enumerate(OTA_STATES, start=1):
        version = f"1.{number}.0"
        # The int8 demo bundle as converted on the host: the guest's int8 kernels round
        # differently, which its self-test tolerance (peak_fraction) must take.
        release = make_release(Path("build/demo-bundles") / MODEL, work / "releases", MODEL, version, keys.private)
        archive = pack(release, site)
        vm.restart_edged(f"EDGED_OTA_PAUSE_AT={state}")
        message = build_message(archive, f"http://{HOST_FROM_GUEST}:{bundle_port}/", [DEVICE], fleet_key=keys.private)
        publish(broker, [topic], message.to_json())
        marker = f"EDGED_OTA_PAUSE_AT={state}: update paused"
        vm.wait(lambda: reached(vm, marker), 300 * vm.slow, f"the update to {version} to reach {state}", 2.0)
        vm.cut()
        vm.boot()
        # What start-up loaded: the journal before the resumed update downloads (a cut at
        # 'watching' logs "active" at start-up instead, when the boot outlasted the window).
        startup = vm.journal().split(f"OTA {MODEL}: downloading")[0]
        wanted = version if state == "watching" else current
        if f"loaded {MODEL} {wanted} " not in startup:
            raise Failure(f"cut at {state}: start-up did not load {wanted}:\n{startup[-1500:]}")
        store = json.loads(vm.python(STORE_CHECK))
        if store["active"] not in (current, version) and not (store["active"] is None and state != "watching"):
            raise Failure(f"cut at {state}: the store's active version is {store['active']}")
        vm.wait(lambda: reached(vm, f"OTA {MODEL}: active") and served_version(vm) == version,
                300 * vm.slow, f"the update to {version} to complete after the cut at {state}", 2.0)
        store = json.loads(vm.python(STORE_CHECK))
        if store["active"] != version or store["leftovers"]:
            raise Failure(f"after the cut at {state}: store {store}, wanted {version} with no leftovers")
        status, answer = vm.request("POST", f"/v2/models/{MODEL}/infer", infer_body("ota", np.random.default_rng(0))[0])
        if status != 200 or answer.get("model_version") != version:
            raise Failure(f"after the cut at {state}: inference gave {status} {str(answer)[:200]}")
        log(f"OTA cut at {state}: booted on {wanted}, store consistent, update to {version} completed")
        results.append({"state": state, "booted_on": wanted, "completed": version})
        current = version
    publish(broker, [topic], b"")
    return results


def configure(vm: Vm, broker_port: int, bundle_port: int) -> None:
    """edged with MQTT to the host's (stopped) broker, HTTP results through the outbox, OTA on."""
    vm.sh(f"""cat > /etc/edged/edged.toml <<'TOML'
models_dir = "/var/lib/edged/models"
state_dir = "/var/lib/edged"
load = ["{MODEL}"]
device_id = "{DEVICE}"
[http]
host = "0.0.0.0"
port = 8080
allow_insecure = true
[mqtt]
enabled = true
host = "{HOST_FROM_GUEST}"
port = {broker_port}
publish_http_results = true
reconnect_min_s = 1
reconnect_max_s = 2
[ota]
enabled = true
allowed_url_prefixes = ["http://{HOST_FROM_GUEST}:{bundle_port}/"]
health_window_s = 5
TOML
rm -f /var/lib/edged/outbox.sqlite* /etc/systemd/system/edged.service.d/test-watchdog.conf
sync""")
    vm.restart_edged()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vm-dir", type=Path, default=Path("build/vm"))
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--slow", type=int, default=1, help="how much longer every wait is (6 under TCG)")
    parser.add_argument("--cuts", type=int, default=20, help="power cuts while results go through the outbox")
    parser.add_argument("--parts", default="outbox,ota")
    args = parser.parse_args()
    split = lambda name: (args.vm_dir / name).read_bytes().decode().split("\0")[:-1]  # noqa: E731
    vm = Vm(split("qemu.argv"), split("ssh.argv"), args.vm_dir / "qemu.pid", args.http_port, args.slow)
    broker_port, bundle_port = free_port(), free_port()
    summary: dict = {"cuts": 0}
    with tempfile.TemporaryDirectory(prefix="edged-power-") as tmp:
        work = Path(tmp)
        (work / "site").mkdir()
        server = serve(work / "site", "127.0.0.1", bundle_port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        broker = mosquitto(work / "broker", broker_port, persistent=True)
        try:
            collector = Collector(broker_port)
            broker.start()
            collector.subscribe_once()
            broker.stop()  # mosquitto saves the collector's session; edged then finds no broker
            configure(vm, broker_port, bundle_port)
            log(f"edged reconfigured: MQTT to {HOST_FROM_GUEST}:{broker_port} (down), OTA from :{bundle_port}")
            if "outbox" in args.parts:
                acked = Acked()
                outbox_cuts(vm, args.cuts, acked)
                summary["cuts"] += args.cuts
                broker.start()
                summary["outbox"] = collector.collect(acked, 300 * args.slow)
                log(f"outbox after {args.cuts} cuts: {summary['outbox']}")
            if "ota" in args.parts:
                if broker.proc is None:
                    broker.start()
                summary["ota"] = ota_cuts(vm, work, broker_port, bundle_port)
                summary["cuts"] += len(summary["ota"])
        except Failure as exc:
            print(f"POWER CUT TEST FAILED: {exc}", file=sys.stderr)
            print(vm.journal()[-4000:], file=sys.stderr)
            return 1
        finally:
            broker.stop()
            server.shutdown()
    summary["boots"] = vm.boots
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
