# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IMAGE  ?= sysdesign:dev

.PHONY: run test proto lint bench clean install image k8s-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sysdesign up

test: $(STAMP) k8s-check
	$(PY) -m pytest -q -p no:cacheprovider --ignore=tests/k8s

# Render every kustomize overlay offline, validate each object against the
# Kubernetes schemas and check the deployment policies (no cluster needed).
k8s-check: $(STAMP)
	$(PY) scripts/k8s_check.py
	$(PY) -m pytest -q -p no:cacheprovider tests/k8s

# Needs a Docker engine (BuildKit); `kind load docker-image $(IMAGE)` afterwards.
image:
	docker build -t $(IMAGE) .

proto: $(STAMP)
	$(PY) scripts/gen_protos.py

lint: $(STAMP)
	$(VENV)/bin/ruff check servers clients tests
	$(VENV)/bin/mypy servers clients

bench: $(STAMP)
	$(VENV)/bin/sysdesign bench shortener

clean:
	rm -rf $(VENV) data build *.egg-info
