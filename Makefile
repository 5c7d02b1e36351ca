# kubelab: `make up` brings up the dev lab, `make test` runs the fast tests.
# Every target does its own set-up on a fresh machine (Debian packages, virtualenv, toolchain).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
STACK ?= dev
export KUBELAB_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kubelab
# The offline-built Pulumi CLI (make tools); a pulumi already on PATH wins. Provider plugins
# are Pulumi's to acquire (downloaded online; a plugin mirror via KUBELAB_PLUGIN_DIR offline),
# so automatic plugin acquisition stays on here; the tests turn it off for their own runs.
export PATH := $(PATH):$(KUBELAB_CACHE)/bin
export PULUMI_SKIP_UPDATE_CHECK := true
export PULUMI_BACKEND_URL ?= file://$(KUBELAB_CACHE)/state
export PULUMI_CONFIG_PASSPHRASE_FILE ?= $(KUBELAB_CACHE)/passphrase
# The offline-built language host predates runtime.options.virtualenv: point it at the venv.
export PULUMI_PYTHON_CMD ?= $(CURDIR)/$(VENV)/bin/python
LAB := $(PYTHON) lab/harness.py
IN_LAB := ip netns exec kubelab

.PHONY: help venv test lint test-deps build-deps tools bundle lab-deps image engine e2e e2e-seed000 e2e-seed000-ha e2e-1plus4 e2e-ha e2e-grow e2e-upgrade e2e-static lab-stack up down kubectl preview etcd-backup etcd-restore

help:
	@echo "make up       build everything needed and bring up the '$(STACK)' stack (1 master + 2 workers on libvirt)"
	@echo "make kubectl ARGS='get nodes'   kubectl against it;  make down   destroy it"
	@echo "make etcd-backup / make etcd-restore [SNAPSHOT=file]   etcd snapshot now / restore the newest (1 master)"
	@echo "make test     fast tests (config, resource graph, rendered files);  make engine / make e2e   slow tiers"
	@echo "make tools    offline toolchain (Pulumi CLI, language host, node bundle) into $(KUBELAB_CACHE);"
	@echo "              ends by listing the provider plugins Pulumi can and cannot find"

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

venv: $(VENV)/.installed

# systemd-analyze (Debian's systemd) verifies rendered units; haproxy (Debian's) runs the node-local
# API load balancer's config on loopback, and is installed without starting its own service (a
# policy-rc.d that refuses, unless the machine has one); kubectl comes from the bundle when built;
# actionlint (pinned in versions.toml [checks]) is built once from its Go module into the cache.
test-deps: venv
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
	@test -x /usr/sbin/haproxy || { policy=/usr/sbin/policy-rc.d; own=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod 0755 $$policy; own=1; fi; \
	  rc=0; { apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy >/dev/null; } || rc=$$?; \
	  [ -z "$$own" ] || rm -f $$policy; exit $$rc; }
	@$(PYTHON) tools/toolchain.py actionlint >/dev/null

lint: venv
	$(VENV)/bin/ruff check .

test: venv test-deps lint
	$(VENV)/bin/pytest

build-deps:
	@missing=$$(for p in $$(cat tools/apt-build.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

# Everything kubelab builds: Pulumi CLI, language host, node bundle. Ends with the provider
# plugins Pulumi can and cannot find (KUBELAB_PLUGIN_DIR=mirror installs missing ones).
tools: venv build-deps
	$(PYTHON) tools/toolchain.py all

# The node bundle alone, for the pinned versions and the versions STACK's file sets
# (make bundle STACK=prod builds what Pulumi.prod.yaml's `versions` ask for).
bundle: venv build-deps
	$(PYTHON) tools/toolchain.py bundle --stack $(STACK)

lab-deps:
	@missing=$$(for p in $$(cat tools/apt-lab.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

image: lab-deps
	@img=$$(bash lab/build_image.sh | tail -n 1); ln -sfn "$$img" "$(KUBELAB_CACHE)/images/debian-trixie.qcow2"; \
	  echo "base image: $(KUBELAB_CACHE)/images/debian-trixie.qcow2 -> $$img"

# Slow tiers on the real engine. A test skips (one loud line naming the missing part and the
# README section) only when the Pulumi CLI or a provider plugin is absent.
engine: venv lab-deps test-deps
	$(VENV)/bin/pytest -m engine tests/test_engine.py

# Real e2e runs on libvirt (TCG here), each writing its timings under .e2e/:
# 1 master + 2 workers (the one CI runs), seed 000's 3 masters that run workloads, and
# existing hosts (plain VMs made outside Pulumi).
e2e: venv bundle image lab-deps
	$(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

e2e-seed000: venv bundle image lab-deps
	KUBELAB_E2E_TOPOLOGY=seed000 $(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

# Three masters that all run pods: more than 2 cores give under TCG (see tests/test_e2e.py).
e2e-seed000-ha: venv bundle image lab-deps
	KUBELAB_E2E_TOPOLOGY=seed000-ha $(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

# 1 master + 4 workers: how bring-up scales with the worker count (#10 compares it with 1+2).
e2e-1plus4: venv bundle image lab-deps
	KUBELAB_E2E_TOPOLOGY=1+4 KUBELAB_E2E_RECREATE=0 $(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

# 3 masters + 1 worker: one master stopped (virsh destroy) while the cluster keeps serving (#12).
e2e-ha: venv bundle image lab-deps
	KUBELAB_E2E_TOPOLOGY=ha KUBELAB_E2E_RECREATE=0 $(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

# 1 master + 1 worker; a second master joins (etcd member add, as a learner) and leaves (#12).
e2e-grow: venv bundle image lab-deps
	KUBELAB_E2E_TOPOLOGY=grow KUBELAB_E2E_RECREATE=0 $(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

# 1 master + 2 workers at Kubernetes 1.36.4, upgraded live to 1.37.2 while a Service is probed (#12).
e2e-upgrade: venv bundle image lab-deps
	KUBELAB_E2E_TOPOLOGY=upgrade KUBELAB_E2E_RECREATE=0 $(VENV)/bin/pytest -m e2e -s tests/test_e2e.py

e2e-static: venv bundle image lab-deps
	$(VENV)/bin/pytest -m e2e -s tests/test_static_e2e.py

# Lab stack set-up shared by up/down/preview: SSH key, passphrase, file backend, stack.
lab-stack: venv
	@mkdir -p "$(KUBELAB_CACHE)/ssh" "$(KUBELAB_CACHE)/state"
	@test -f "$(KUBELAB_CACHE)/ssh/id_ed25519" || ssh-keygen -q -t ed25519 -N '' -C kubelab-lab -f "$(KUBELAB_CACHE)/ssh/id_ed25519"
	@test -f "$(PULUMI_CONFIG_PASSPHRASE_FILE)" || (umask 077; head -c 24 /dev/urandom | base64 > "$(PULUMI_CONFIG_PASSPHRASE_FILE)")
	@pulumi stack select $(STACK) 2>/dev/null || pulumi stack init $(STACK)

up: tools image lab-deps lab-stack
	$(LAB) up
	$(IN_LAB) pulumi up --yes --skip-preview --stack $(STACK)
	@echo; echo "Cluster is up. Try:  make kubectl ARGS='get nodes -o wide'"
	@echo "Kubeconfig:  pulumi stack output kubeconfig --show-secrets --stack $(STACK) > kubeconfig"

preview: lab-stack
	$(LAB) up
	$(IN_LAB) pulumi preview --diff --stack $(STACK)

kubectl:
	@kc=$$(mktemp); trap 'rm -f $$kc' EXIT; pulumi stack output kubeconfig --show-secrets --stack $(STACK) > $$kc; \
	  $(IN_LAB) $$(ls $(KUBELAB_CACHE)/bundles/*/bin/kubectl | head -n1) --kubeconfig $$kc $(ARGS)

# etcd snapshots of the lab stack's masters (the timer takes one every backup.interval).
etcd-backup: lab-stack
	$(LAB) up
	$(IN_LAB) $(VENV)/bin/python tools/etcd_ops.py backup --stack $(STACK)

etcd-restore: lab-stack
	$(LAB) up
	$(IN_LAB) $(VENV)/bin/python tools/etcd_ops.py restore --stack $(STACK) $(if $(SNAPSHOT),--snapshot $(SNAPSHOT))

down: lab-stack
	$(LAB) up
	$(IN_LAB) pulumi destroy --yes --skip-preview --stack $(STACK)
	$(LAB) down
