#!/usr/bin/env bash
# `make test-arm64`: the Raspberry Pi stand-in. A Debian 12 (bookworm) arm64 rootfs,
# run under qemu-user-static through binfmt_misc, gets edged[tflite,onnx] from real
# aarch64 wheels, then runs `edged doctor`, serves the demo bundles and answers
# inference requests that must match each bundle's samples.npz.
#
# Needs root (debootstrap, chroot, binfmt_misc). The rootfs is cached in build/arm64/
# (delete build/arm64/rootfs to rebuild). Network use: Debian packages and PyPI from the
# host only; the daemon in the chroot listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
A=$PWD/build/arm64
ROOT=$A/rootfs
PY=${PY:-.venv/bin/python}
MIRROR=${EDGED_ARM64_MIRROR:-http://deb.debian.org/debian}
EXTRAS=tflite,onnx
T0=$(date +%s); step_t=$T0
say() { local now; now=$(date +%s); printf '[arm64 %4ds +%3ds] %s\n' $((now - T0)) $((now - step_t)) "$*"; step_t=$now; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# 1. qemu-user-static + binfmt_misc, so arm64 binaries run (the F flag: no qemu copy in the rootfs)
need=""
command -v debootstrap >/dev/null || need="$need debootstrap"
[[ -x /usr/bin/qemu-aarch64-static ]] || need="$need qemu-user-static"
command -v update-binfmts >/dev/null || need="$need binfmt-support"
if [[ -n $need ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
fi
[[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64 \
  || fail "cannot register qemu-aarch64 with binfmt_misc"
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || fail "qemu-aarch64 binfmt entry is disabled"
say "qemu-aarch64 registered with binfmt_misc"

# 2. the rootfs (cached)
if [[ ! -x $ROOT/usr/bin/python3 || ! -f $ROOT/.edged-complete ]]; then
  rm -rf "$ROOT"
  debootstrap --variant=minbase --arch=arm64 --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT" "$MIRROR"
  touch "$ROOT/.edged-complete"
  say "debootstrap arm64 bookworm rootfs"
else
  say "rootfs: cached ($ROOT)"
fi
[[ $(chroot "$ROOT" uname -m) == aarch64 ]] || fail "the chroot does not run aarch64"
glibc=$(chroot "$ROOT" ldd --version | awk 'NR==1{print $NF}')
say "chroot: $(chroot "$ROOT" python3 --version), glibc $glibc, uname -m aarch64"

# 3. aarch64 wheels, downloaded on the host (the chroot installs offline)
[[ -d build/demo-bundles/digits-tflite ]] || fail "build/demo-bundles missing: run make demo"
rm -f build/dist/edged-*.whl
"$PY" -m pip wheel -q --no-deps -w build/dist . >/dev/null
WHEEL=$(ls build/dist/edged-*.whl)
mkdir -p "$A/wheels"; rm -f "$A"/wheels/edged-*.whl
"$PY" -m pip download -q -d "$A/wheels" --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 --platform any "$WHEEL[$EXTRAS]" 2>&1 | grep -v '^WARNING: Location' || true
ls "$A"/wheels/ | grep -E '^(onnxruntime|ai_edge_litert|numpy)-' | sed 's/^/  wheel: /'
say "aarch64 wheels ready ($(ls "$A/wheels" | wc -l) files)"

# 4. install and check inside the chroot
mount --bind /proc "$ROOT/proc" 2>/dev/null || true
mount --bind /dev "$ROOT/dev" 2>/dev/null || true
cleanup() {
  [[ -n ${SERVE_PID:-} ]] && kill "$SERVE_PID" 2>/dev/null || true
  umount "$ROOT/proc" "$ROOT/dev" 2>/dev/null || true
}
trap cleanup EXIT
rm -rf "$ROOT/work" && mkdir -p "$ROOT/work/wheels" "$ROOT/work/models"
cp "$A"/wheels/*.whl "$ROOT/work/wheels/"
cp -r build/demo-bundles/digits-tflite build/demo-bundles/digits-onnx "$ROOT/work/models/"
CHROOT_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)  # none of the host's pip settings
"${CHROOT_ENV[@]}" chroot "$ROOT" sh -c "rm -rf /opt/edged && python3 -m venv /opt/edged && /opt/edged/bin/pip install -q --no-index \
  --find-links /work/wheels 'edged[$EXTRAS]'" || fail "pip install in the arm64 chroot"
say "pip install edged[$EXTRAS] in the chroot"
"${CHROOT_ENV[@]}" chroot "$ROOT" /opt/edged/bin/edged doctor | tee "$A/doctor.txt"
grep -qi aarch64 "$A/doctor.txt" || fail "edged doctor does not report aarch64"
say "edged doctor"

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'models_dir = "/work/models"\nstate_dir = "/work/state"\nthreads = 1\n[http]\nhost = "127.0.0.1"\nport = %s\n' "$PORT" > "$ROOT/work/edged.toml"
"${CHROOT_ENV[@]}" chroot "$ROOT" /opt/edged/bin/edged serve --config /work/edged.toml > "$A/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 240); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" && break; sleep 1; done
curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" || { tail -30 "$A/serve.log"; fail "edged serve in the chroot not ready"; }
say "edged serve ready in the arm64 chroot"
"$PY" - "$PORT" <<'EOF' || fail "inference in the arm64 chroot"
# Every held-out digit through the aarch64 daemon, against the same bundle run on this
# x86 host (edged's own runtime code) and against the bundle's samples.npz.
import json, sys, urllib.request
from pathlib import Path
import numpy as np
from edged.bundle import open_bundle
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions
port = sys.argv[1]
with np.load("build/demo-data/digits_test.npz") as d:
    held_out, labels = d["x"].astype(np.float32), d["y"]
def remote(model, x):
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=300).read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
for model in ("digits-tflite", "digits-onnx"):
    bundle = open_bundle(Path("build/demo-bundles") / model)
    samples_x, samples_y = bundle.load_samples()
    got_samples = remote(model, samples_x["input"].astype(np.float32))
    local = LoadedModel.load(bundle, RuntimeOptions(threads=1), warmup=0)
    host = local.infer({"input": held_out})["logits"]
    local.unload()
    arm = remote(model, held_out)
    agree_host = float(np.mean(arm.argmax(1) == host.argmax(1)))
    agree_samples = float(np.mean(got_samples.argmax(1) == samples_y["logits"].argmax(1)))
    accuracy = float(np.mean(arm.argmax(1) == labels))
    print(f"{model}: aarch64 vs x86 top-1 agreement {agree_host:.3f} on {len(held_out)} held-out digits, "
          f"max |diff| {float(np.abs(arm - host).max()):.4f}; samples.npz agreement {agree_samples:.3f}; accuracy {accuracy:.3f}")
    if agree_host < 0.99 or agree_samples < 1.0:
        sys.exit(1)
EOF
say "inference on both demo bundles matches samples.npz"
echo "ARM64 TEST PASSED in $(( $(date +%s) - T0 ))s"
