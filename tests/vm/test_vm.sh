#!/usr/bin/env bash
# `make test-vm`: edged as a systemd service on a real (virtual) Debian 12 machine.
# Boots build/vm/base.img (tests/vm/build_image.sh) under qemu/KVM on a throw-away qcow2
# overlay, installs the edged wheel from local wheels, runs `edged install`, then checks:
# active + HTTP inference through a 127.0.0.1 port forward, watchdog restart after
# SIGSTOP, restart after SIGKILL, and that the service comes back after a reboot.
# All three runtimes (onnxruntime, ai-edge-litert, OpenVINO) serve under the hardened
# unit, and `systemctl reload` (SIGHUP) loads a newly listed model while a client keeps
# sending requests: none may fail.
#
# Environment:
#   EDGED_VM_KEEP=1     leave the VM running at the end (and after a failure), with how to reach it
#   EDGED_VM_ACCEL=tcg  skip the KVM probe and use software emulation
#   G_TIMEOUT=SECONDS   limit for each guest command (default 120 under KVM; under TCG, where the
#                       guest's pip install alone takes 5 to 6 minutes, 120 x EDGED_VM_SLOWDOWN)
#   EDGED_VM_SLOWDOWN=N how much longer every wait is under TCG (default 6; 1 under KVM)
#   EDGED_VM_STEPS="reload watchdog reboot power ansible"
#                       the checks to run after the install (all by default), in that order
#   EDGED_VM_CUTS=N     power cuts while results go through the outbox (default 20; then one cut
#                       in each of the 9 OTA states): tests/vm/power_cut.py
#   EDGED_VM_POWER_PARTS=outbox,ota  which power-cut parts run
#   EDGED_VM_ANSIBLE=0  skip the Ansible step (as leaving ansible out of EDGED_VM_STEPS does)
# A failure names the step it happened in and prints the guest's `journalctl -u edged`
# before the VM is destroyed.
set -euo pipefail
cd "$(dirname "$0")/../.."
VM=build/vm
PY=${PY:-.venv/bin/python}
BUNDLE=${EDGED_VM_BUNDLE:-digits-onnx}
LATE=${EDGED_VM_LATE_BUNDLE:-digits-openvino}   # listed only at the reload
BUNDLES=${EDGED_VM_BUNDLES:-digits-onnx digits-tflite digits-openvino}
EXTRAS=${EDGED_VM_EXTRAS:-onnx,tflite,openvino,ota}
STEPS=" ${EDGED_VM_STEPS:-reload watchdog reboot power ansible} "
[[ ${EDGED_VM_ANSIBLE:-1} == 1 ]] || STEPS=${STEPS/ ansible / }
wanted() { [[ $STEPS == *" $1 "* ]]; }
T0=$(date +%s)
step_t=$T0
STEP="building the VM image"
# say: a step is done (and the next one named, for failure messages); step: name the next one.
say() { local now; now=$(date +%s); printf '[vm %4ds +%3ds] %s\n' $((now - T0)) $((now - step_t)) "$*"; step_t=$now; STEP="after: $*"; }
step() { STEP=$*; }
fail() { echo "FAIL (step: $STEP): $*" >&2; echo "--- console tail" >&2; tail -n 30 "$VM/console.log" >&2 || true; exit 1; }

tests/vm/build_image.sh
say "image ready"

# Wheels: the project wheel plus everything `edged[$EXTRAS]` needs, for the guest's
# CPython 3.11 on manylinux x86_64. Downloaded on the host; the guest has no network use.
rm -f build/dist/edged-*.whl
"$PY" -m pip wheel -q --no-deps -w build/dist . >/dev/null 2>&1 || "$PY" -m pip wheel --no-deps -w build/dist .
WHEEL=$(ls build/dist/edged-*.whl)
mkdir -p "$VM/wheels"; rm -f "$VM"/wheels/edged-*.whl
"$PY" -m pip download -q -d "$VM/wheels" --only-binary=:all: --python-version 3.11 \
  --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform any "$WHEEL[$EXTRAS]" 2>&1 | grep -v '^WARNING: Location' || true
for b in $BUNDLES; do [[ -d build/demo-bundles/$b ]] || fail "build/demo-bundles/$b missing: run make demo"; done
say "wheels ready ($(ls "$VM/wheels" | wc -l) files)"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step "preparing the VM"
SSH_PORT=$(free_port); HTTP_PORT=$(free_port)
KEY=$VM/id_ed25519
SSH=(ssh -q -i "$KEY" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
     -o LogLevel=ERROR -o ConnectTimeout=5 -o BatchMode=yes -o ServerAliveInterval=5 -o ServerAliveCountMax=3 root@127.0.0.1)
# qemu's user-mode net accepts the TCP connection even while the guest is down, so an
# ssh can hang in the handshake: every guest command gets a hard time limit, G_TIMEOUT
# (set below, after KVM or TCG is chosen). Polling loops pass their own G_LIMIT and
# expect timeouts; any other command that runs out of time says so, naming the step.
g() {
  local limit=${G_LIMIT:-$G_TIMEOUT} rc=0
  timeout "$limit" "${SSH[@]}" "$@" || rc=$?
  if (( rc == 124 )) && [[ -z ${G_LIMIT:-} ]]; then
    echo "FAIL (step: $STEP): a guest command ran past G_TIMEOUT=${limit}s (raise it with G_TIMEOUT=SECONDS): $(head -n 3 <<<"$*")" >&2
  fi
  return $rc
}

rm -f "$VM/run.qcow2" "$VM/console.log"
qemu-img create -q -f qcow2 -b base.img -F raw "$VM/run.qcow2"
# KVM when /dev/kvm exists and actually runs a guest: some nested setups expose /dev/kvm
# but the kernel never gets past the real-mode setup. A 10s probe decides; else TCG.
ACCEL=(-machine accel=tcg -cpu max)
if [[ -w /dev/kvm && ${EDGED_VM_ACCEL:-auto} != tcg ]]; then
  if timeout 10 qemu-system-x86_64 -enable-kvm -cpu host -m 256 -display none -no-reboot \
       -kernel "$VM/vmlinuz" -append "console=ttyS0 panic=-1" -serial stdio 2>/dev/null | grep -q -m1 'Linux version'; then
    ACCEL=(-enable-kvm -cpu host)
  else
    echo "/dev/kvm exists but a KVM guest does not boot here (nested virtualisation?): using TCG" >&2
  fi
fi
if [[ ${ACCEL[0]} == -enable-kvm ]]; then SLOW=1; else SLOW=${EDGED_VM_SLOWDOWN:-6}; fi
G_TIMEOUT=${G_TIMEOUT:-$((120 * SLOW))}
wait_s() { echo $(( $1 * SLOW )); }  # a wait bound sized for KVM, scaled for TCG
QEMU=(qemu-system-x86_64 "${ACCEL[@]}" -m 2048 -smp 2 -display none
  -kernel "$VM/vmlinuz" -initrd "$VM/initrd.img" -append "root=/dev/vda rw console=ttyS0 net.ifnames=0"
  -drive file="$VM/run.qcow2",if=virtio,format=qcow2
  -netdev user,id=n0,hostfwd=tcp:127.0.0.1:"$SSH_PORT"-:22,hostfwd=tcp:127.0.0.1:"$HTTP_PORT"-:8080
  -device virtio-net-pci,netdev=n0 -serial file:"$VM/console.log" -pidfile "$VM/qemu.pid" -daemonize)
# tests/vm/power_cut.py boots the same VM again after each cut: it reads both command lines.
printf '%s\0' "${QEMU[@]}" > "$VM/qemu.argv"; printf '%s\0' "${SSH[@]}" > "$VM/ssh.argv"
"${QEMU[@]}"
cleanup() {
  local rc=$?
  if (( rc != 0 )); then
    echo "FAILED with exit code $rc in step: $STEP" >&2
    echo "--- guest: journalctl -u edged (last 200 lines)" >&2
    G_LIMIT=60 g 'journalctl -u edged --no-pager -n 200; systemctl status --no-pager edged' >&2 \
      || echo "(the guest did not answer over ssh)" >&2
    echo "--- console tail" >&2; tail -n 30 "$VM/console.log" >&2 || true
  fi
  if [[ ${EDGED_VM_KEEP:-0} == 1 ]]; then echo "VM left running: ssh -i $KEY -p $SSH_PORT root@127.0.0.1; http://127.0.0.1:$HTTP_PORT"; return; fi
  [[ -f $VM/qemu.pid ]] && kill "$(cat "$VM/qemu.pid")" 2>/dev/null || true
}
trap cleanup EXIT
say "qemu started (${ACCEL[*]}), ssh 127.0.0.1:$SSH_PORT, http 127.0.0.1:$HTTP_PORT, G_TIMEOUT ${G_TIMEOUT}s"

wait_ssh() { local end=$(( $(date +%s) + ${1:-$(wait_s 300)} )); while (( $(date +%s) < end )); do G_LIMIT=$(wait_s 15) g true 2>/dev/null && return 0; sleep 2; done; fail "no ssh"; }
step "booting the guest until ssh answers"
wait_ssh
say "guest booted, ssh answers"
step "copying wheels and bundles, pip install in the guest"

tar -C build -cf - dist/"$(basename "$WHEEL")" vm/wheels $(printf 'demo-bundles/%s ' $BUNDLES) | g 'rm -rf /root/edged && mkdir -p /root/edged && tar -C /root/edged -xf -'
g "set -e
python3 -m venv /opt/edged/venv
/opt/edged/venv/bin/pip install -q --no-index --find-links /root/edged/vm/wheels '/root/edged/dist/$(basename "$WHEEL")[$EXTRAS]'
mkdir -p /var/lib/edged/models && cp -r /root/edged/demo-bundles/* /var/lib/edged/models/
cat > /root/edged.toml <<'TOML'
# 0.0.0.0 inside the VM: qemu's user-mode hostfwd connects to the guest's NIC address.
# $LATE is left out here; the reload step adds it.
models_dir = \"/var/lib/edged/models\"
state_dir = \"/var/lib/edged\"
load = [$(for b in $BUNDLES; do [[ $b == "$LATE" ]] || printf '"%s", ' "$b"; done)]
[http]
host = \"0.0.0.0\"
port = 8080
# A test VM behind qemu's host-only port forward: no TLS or tokens (edged refuses a
# non-loopback listen without them unless told so).
allow_insecure = true
TOML"
say "venv + wheels installed in the guest"
step "edged install"
g "/opt/edged/venv/bin/edged install --venv /opt/edged/venv --config /root/edged.toml" || { g 'journalctl -u edged --no-pager | tail -40' || true; fail "edged install"; }
say "edged install: done"
[[ $(g systemctl is-active edged) == active ]] || fail "edged not active"
[[ $(g systemctl is-enabled edged) == enabled ]] || fail "edged not enabled"
step "second edged install (must change nothing)"
echo "second install (must change nothing):"
g "/opt/edged/venv/bin/edged install --venv /opt/edged/venv --config /root/edged.toml" | tee /tmp/edged-vm-install2.log
grep -q 'nothing to do' /tmp/edged-vm-install2.log || fail "second edged install changed something"

BODY=$("$PY" -c 'import json; print(json.dumps({"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":[0.0]*64}]}))')
infer() {  # [MODEL]
  local out; out=$(curl -sf --max-time "$(wait_s 10)" -H 'Content-Type: application/json' -d "$BODY" "http://127.0.0.1:$HTTP_PORT/v2/models/${1:-$BUNDLE}/infer") || return 1
  "$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); o=d["outputs"][0]; assert o["shape"]==[1,10], o; print("infer ok:", o["name"], o["shape"])' "$out"
}
ready() { curl -sf --max-time "$(wait_s 3)" -o /dev/null "http://127.0.0.1:$HTTP_PORT/v2/health/ready"; }
step "HTTP inference from the host"
infer || fail "inference through 127.0.0.1:$HTTP_PORT"
say "HTTP inference from the host works"
for b in $BUNDLES; do [[ $b == "$LATE" ]] || infer "$b" || fail "inference on $b under the hardened unit"; done
say "every runtime loaded at start serves under the hardened unit"

if wanted reload; then
# Reload: list $LATE in the config and `systemctl reload` while a keep-alive client
# keeps sending requests to $BUNDLE; none may fail, the MainPID stays, $LATE loads.
step "systemctl reload under a client loop"
P0=$(g systemctl show -p MainPID --value edged)
rm -f "$VM/client.stop"
"$PY" - "$HTTP_PORT" "$BUNDLE" "$VM/client.stop" > "$VM/client.json" <<'PYCLIENT' &
import http.client, json, os, sys, time
port, model, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]})
ok = bad = 0
errors = []
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
end = time.time() + 300
while not os.path.exists(stop) and time.time() < end:
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status == 200:
            ok += 1
        else:
            bad += 1
            errors.append(f"{resp.status} {data[:200]!r}")
    except Exception as exc:  # a dropped connection counts as a failed request
        bad += 1
        errors.append(repr(exc))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
print(json.dumps({"ok": ok, "failed": bad, "errors": errors[:5]}))
PYCLIENT
CLIENT=$!
sleep 3
g "sed -i 's/^load = \\[/load = [\"$LATE\", /' /etc/edged/edged.toml && grep '^load' /etc/edged/edged.toml && systemctl reload edged"
for _ in $(seq 1 "$(wait_s 120)"); do
  curl -sf --max-time 3 -o /dev/null "http://127.0.0.1:$HTTP_PORT/v2/models/$LATE/ready" && break; sleep 1
done
sleep 2
touch "$VM/client.stop"; wait "$CLIENT" || true
cat "$VM/client.json"
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if r["ok"] > 0 and r["failed"] == 0 else 1)' "$VM/client.json" \
  || fail "requests failed across systemctl reload: $(cat "$VM/client.json")"
[[ $(g systemctl show -p MainPID --value edged) == "$P0" ]] || fail "systemctl reload restarted the daemon"
infer "$LATE" || fail "$LATE (listed at the reload) does not serve"
g "systemctl show -p StatusText --value edged"
say "systemctl reload: $LATE loaded under the hardened unit, MainPID $P0 kept, no failed request ($(cat "$VM/client.json"))"
fi

mainpid() { g systemctl show -p MainPID --value edged; }
# wait until edged has a MainPID other than $1, is active, and answers HTTP
wait_new_pid() {
  local old=$1 pid
  for _ in $(seq 1 "$(wait_s 120)"); do
    pid=$(G_LIMIT=$(wait_s 15) mainpid 2>/dev/null || echo 0)
    if [[ $pid != 0 && $pid != "$old" && $(g systemctl is-active edged 2>/dev/null) == active ]] && ready; then echo "$pid"; return 0; fi
    sleep 1
  done
  g 'systemctl status --no-pager edged; journalctl -u edged --no-pager | tail -30' >&2 || true
  fail "edged did not come back (old MainPID $old)"
}

if wanted watchdog; then
step "watchdog: drop-in WatchdogSec=5, then SIGSTOP"
g "mkdir -p /etc/systemd/system/edged.service.d && printf '[Service]\nWatchdogSec=5\nTimeoutAbortSec=5\n' > /etc/systemd/system/edged.service.d/test-watchdog.conf && systemctl daemon-reload && systemctl restart edged"
ready || fail "not ready after restart with WatchdogSec=5"
P1=$(mainpid); NR0=$(g systemctl show -p NRestarts --value edged)
say "drop-in WatchdogSec=5 active, MainPID $P1"
sleep 8   # a few watchdog periods: the pings keep it alive
[[ $(mainpid) == "$P1" ]] || fail "edged restarted although it was healthy"
g "kill -STOP $P1"
P2=$(wait_new_pid "$P1")
g "journalctl -u edged --no-pager | grep -i 'watchdog timeout'" | tail -1 || fail "no watchdog timeout in the journal"
infer
say "SIGSTOP $P1 -> watchdog restart, new MainPID $P2"
step "SIGKILL: systemd restarts edged"
g "kill -9 $P2"
P3=$(wait_new_pid "$P2")
infer
NR=$(g systemctl show -p NRestarts --value edged)
say "SIGKILL $P2 -> restarted, new MainPID $P3 (NRestarts $NR0 -> $NR)"
fi

if wanted reboot; then
step "reboot: edged comes back"
G_LIMIT=10 g "systemctl reboot" || true
for _ in $(seq 1 "$(wait_s 60)"); do G_LIMIT=5 g true 2>/dev/null || break; sleep 1; done
wait_ssh
for _ in $(seq 1 "$(wait_s 120)"); do ready && break; sleep 1; done
[[ $(g systemctl is-active edged) == active ]] || fail "edged not active after reboot"
infer || fail "inference after reboot"
for b in $BUNDLES; do infer "$b" || fail "inference on $b after reboot"; done
say "reboot: edged active and answering again"
fi
if wanted power; then
  step "power cuts (tests/vm/power_cut.py)"
  "$PY" tests/vm/power_cut.py --vm-dir "$VM" --http-port "$HTTP_PORT" --slow "$SLOW" --cuts "${EDGED_VM_CUTS:-20}" \
    --parts "${EDGED_VM_POWER_PARTS:-outbox,ota}" 2>&1 \
    | tee "$VM/power.log" || fail "power cuts: $(grep -m1 "FAILED" "$VM/power.log")"
  say "power cuts: $(tail -n 1 "$VM/power.log")"
fi
if wanted ansible; then step "Ansible role"; source tests/vm/ansible_vm.sh; fi
echo "VM TEST PASSED in $(( $(date +%s) - T0 ))s"

