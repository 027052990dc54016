# edged: `make run` serves the demo models, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO := build/demo-bundles
PYTEST_ARGS ?=

.PHONY: help venv install install-test install-torch install-tf install-tf-if-possible system-deps demo run test test-fast test-unit test-vm test-arm64 bench install-peers clean

help:
	@echo "make run     set up .venv, build the demo bundles, serve them on 127.0.0.1:8080"
	@echo "make test    install test dependencies (apt + pip) and run pytest"
	@echo "make test-fast   every test but the heavy conversion routes (no build/*-venv), for quick loops"
	@echo "make bench   run benchmarks and write BENCHMARKS.md"
	@echo "make test-vm     boot a Debian 12 VM: edged as a systemd service, watchdog, reboot, Ansible (root, minutes)"
	@echo "make test-arm64  arm64 chroot under qemu-user: aarch64 wheels, doctor, inference (root, minutes)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# Stamps re-run pip only when pyproject.toml changes.
$(VENV)/.stamp-all: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[all,convert]'
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.stamp-all
install-test: $(VENV)/.stamp-test

# PyTorch -> TFLite (litert-torch: torch, jax, transformers, several GB) lives in its own venv,
# like a build machine, so .venv stays small; the tests call its `edged convert`.
# It is PyPI's torch, the CUDA build: PyPI has no CPU-only torch for Linux x86_64 (the +cpu
# builds are only on PyTorch's own index), and the CUDA build does not import without its
# nvidia-* libraries (libcudnn...). A local torch +cpu wheel does not help either: onnx2torch
# imports torchvision, whose PyPI builds need the CUDA torch of the same release (0.29.1
# upgrades torch to 2.14.1; 0.28.0 beside torch 2.13.0+cpu fails with "operator
# torchvision::nms does not exist"). Cost: about 6.8 GB, 3.2 GB of it nvidia-*.
TORCH_VENV := build/torch-venv
TORCH_VENV_NEEDS_GB := 10
$(TORCH_VENV)/.stamp: pyproject.toml
	@mkdir -p build; free=$$(df -Pk build | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(TORCH_VENV_NEEDS_GB) ]; then \
	  echo "error: $(TORCH_VENV) needs about $(TORCH_VENV_NEEDS_GB) GB free (6.8 GB venv plus pip's downloads); $$(df -Ph build | awk 'NR==2 {print $$4}') free on the disk of build/. Free space, or run make test-fast."; exit 1; fi
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet -e '.[convert-torch,onnx]'
	touch $@

install-torch: $(TORCH_VENV)/.stamp

# onnx2tf (ONNX -> int8 TFLite for LSTM/GRU/SpaceToDepth/... graphs, converters/onnx_tf.py) with
# TensorFlow in its own venv: onnx2tf 2.x needs Python >= 3.12 (TF_PYTHON, else the first python3.12+
# found on PATH or under pyenv) and pins numpy/onnx/onnxruntime/protobuf exactly. tensorflow-cpu
# instead of onnx2tf[tensorflow]'s full tensorflow; tf-keras 2.21 without deps (it asks for `tensorflow`,
# which tensorflow-cpu provides). The stamp names the versions, so changing them rebuilds.
TF_VENV := build/tf-venv
TF_REQUIREMENTS := onnx2tf==2.6.9 tensorflow-cpu==2.21.0
TF_STAMP := $(TF_VENV)/.stamp-onnx2tf-2.6.9-tf-2.21.0
$(TF_STAMP):
	@py="$(TF_PYTHON)"; \
	if [ -z "$$py" ]; then \
	  for c in python3.12 python3.13 python3.14 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3; do \
	    if "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then echo "error: make install-tf needs Python >= 3.12 for onnx2tf 2.x: set TF_PYTHON=/path/to/python3.12"; exit 1; fi; \
	echo "creating $(TF_VENV) with $$py"; rm -rf $(TF_VENV); "$$py" -m venv $(TF_VENV)
	$(TF_VENV)/bin/pip install --quiet --upgrade pip
	$(TF_VENV)/bin/pip install --quiet $(TF_REQUIREMENTS)
	$(TF_VENV)/bin/pip install --quiet --no-deps tf-keras==2.21.0
	touch $@

install-tf: $(TF_STAMP)

# `make test` and `make bench` build the onnx2tf venv where a Python >= 3.12 exists (Debian 12
# ships 3.11); without one they say so and its tests skip with that reason.
install-tf-if-possible:
	@if [ -n "$(TF_PYTHON)" ] || ls $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 >/dev/null 2>&1 || \
	    command -v python3.12 >/dev/null || command -v python3.13 >/dev/null; then \
	  $(MAKE) --no-print-directory install-tf; \
	else echo "note: no Python >= 3.12 here: the onnx2tf route (make install-tf) is not built, its tests skip"; fi

# mosquitto, the pushgateway and promtool are Debian packages; apt starts neither service.
system-deps:
	@missing=""; \
	[ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	[ -x /usr/bin/prometheus-pushgateway ] || missing="$$missing prometheus-pushgateway"; \
	[ -x /usr/bin/promtool ] || missing="$$missing prometheus"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v tc >/dev/null || missing="$$missing iproute2"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: install
	$(PY) scripts/build_demo.py --out $(DEMO)

run: demo
	$(VENV)/bin/edged serve --config examples/edged.toml

# pytest exits 5 when it collected no tests: that is a failure here.
test: system-deps install-test install-torch install-tf-if-possible
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Every test but the heavy conversion routes (PyTorch, TensorFlow and onnx2tf, which need
# their own build venvs, and the real-model corpus): a quick local loop. CI runs `make test`.
HEAVY_TESTS := tests/e2e/test_convert_torch.py tests/e2e/test_convert_tf.py tests/e2e/test_convert_onnx_tf.py \
	tests/e2e/test_corpus.py
test-fast: system-deps install-test
	$(PY) -m pytest $(addprefix --ignore=,$(HEAVY_TESTS)) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-unit: install-test
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Not part of `make test`: boots a Debian 12 VM (qemu/KVM, needs root for debootstrap;
# the image is cached in build/vm/), installs edged as a systemd service and kills it.
test-vm: demo
	PY=$(PY) tests/vm/test_vm.sh

# Not part of `make test`: an arm64 Debian 12 chroot under qemu-user-static (binfmt_misc, needs
# root; cached in build/arm64/) installs edged[tflite,onnx] from aarch64 wheels and serves the demo.
test-arm64: demo
	PY=$(PY) tests/arm64/test_arm64.sh

# The peers section of `make bench` (benchmarks/peers.py) serves the same ONNX files through MLServer
# and a naive FastAPI app, each in its own venv from benchmarks/peer_apps/requirements-*.txt. A venv is
# rebuilt when its requirements file changes; one that fails to install gets no stamp, and the section
# then skips that peer with a note instead of failing `make bench`.
PEERS_DIR := build/peers
install-peers:
	@for peer in mlserver fastapi; do \
	  venv=$(PEERS_DIR)/$$peer-venv; req=benchmarks/peer_apps/requirements-$$peer.txt; \
	  if [ -f $$venv/.stamp ] && [ $$venv/.stamp -nt $$req ]; then continue; fi; \
	  echo "creating $$venv"; rm -rf $$venv; \
	  if $(PYTHON) -m venv $$venv && $$venv/bin/pip install --quiet -r $$req; then touch $$venv/.stamp; \
	  else echo "note: $$peer did not install into $$venv: make bench skips it in the peers section"; fi; \
	done

bench: system-deps install-test install-torch install-tf-if-possible install-peers
	$(PY) -m benchmarks.run

clean:
	rm -rf build .edged-state benchmarks/results/*.tmp
