# Every target creates the virtualenv when it is missing, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

RUN_DIR ?= $(CURDIR)/run
ENDPOINT ?= unix://$(RUN_DIR)/csi.sock
METRICS_ADDRESS ?= 127.0.0.1:9402

.PHONY: venv run test lint proto bench demo image clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(RUN_DIR)
	@echo "Starting cert-agent (standalone: self-signed CA, state in $(RUN_DIR)). In another terminal:"
	@echo "  $(BIN)/cert-agent publish --endpoint $(ENDPOINT) --target $(RUN_DIR)/pods/es-0/tls \\"
	@echo "      --pod-name es-0 --pod-namespace elastic --attr 'dns-names=\$${POD_NAME}.\$${POD_NAMESPACE}.svc.cluster.local'"
	@echo "  openssl verify -CAfile $(RUN_DIR)/pods/es-0/tls/ca.crt -untrusted $(RUN_DIR)/pods/es-0/tls/tls.crt $(RUN_DIR)/pods/es-0/tls/tls.crt"
	@echo "  $(BIN)/cert-agent unpublish --endpoint $(ENDPOINT) --target $(RUN_DIR)/pods/es-0/tls"
	@echo "Metrics: http://$(METRICS_ADDRESS)/metrics   Stop with Ctrl-C."
	$(BIN)/cert-agent serve --standalone \
		--endpoint $(ENDPOINT) \
		--data-root $(RUN_DIR)/data \
		--node-id $$(hostname) \
		--metrics-address $(METRICS_ADDRESS)

test: $(STAMP)
	$(BIN)/pytest -q -rs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: $(STAMP)
	PYTHON=$(BIN)/python proto/generate.sh

bench: $(STAMP)
	$(BIN)/python -m tests.bench_agent --output docs/benchmarks.md

IMAGE ?= ghcr.io/csi-cert-agent/cert-agent
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	docker build --pull -t $(IMAGE):$(VERSION) .

demo: $(STAMP)
	$(BIN)/python -m agent.demo

clean:
	@# Mounts outlive the agent on purpose (pods keep their files across restarts); drop ours.
	-grep -o " $(RUN_DIR)[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .mypy_cache .ruff_cache
