# Every target creates the virtualenv when it is missing, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

RUN_DIR ?= $(CURDIR)/run
ENDPOINT ?= unix://$(RUN_DIR)/csi.sock
METRICS_ADDRESS ?= 127.0.0.1:9402

.PHONY: venv run test soak lint proto bench bench-quick demo image image-base image-local \
	image-smoke clean dashboard

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(RUN_DIR)
	@echo "Starting cert-agent (standalone: self-signed CA, state in $(RUN_DIR)). In another terminal:"
	@echo "  T=$(RUN_DIR)/kubelet/pods/es-0/volumes/kubernetes.io~csi/tls/mount"
	@echo "  $(BIN)/cert-agent publish --endpoint $(ENDPOINT) --target \$$T \\"
	@echo "      --pod-name es-0 --pod-namespace elastic --attr 'dns-names=\$${POD_NAME}.\$${POD_NAMESPACE}.svc.cluster.local'"
	@echo "  openssl verify -CAfile \$$T/ca.crt -untrusted \$$T/tls.crt \$$T/tls.crt"
	@echo "  $(BIN)/cert-agent status --data-root $(RUN_DIR)/data"
	@echo "  $(BIN)/cert-agent unpublish --endpoint $(ENDPOINT) --target \$$T"
	@echo "Metrics: http://$(METRICS_ADDRESS)/metrics   Stop with Ctrl-C."
	$(BIN)/cert-agent serve --standalone \
		--endpoint $(ENDPOINT) \
		--data-root $(RUN_DIR)/data \
		--kubelet-root $(RUN_DIR)/kubelet \
		--node-id $$(hostname) \
		--metrics-address $(METRICS_ADDRESS)

test: $(STAMP)
	$(BIN)/pytest -q -rs

# The long versions of the crash trials and the property-based path and pod-info tests (CI runs
# short ones).
SOAK_KILLS ?= 90
SOAK_EXAMPLES ?= 2000
soak: $(STAMP)
	CERT_AGENT_CRASH_KILLS=$(SOAK_KILLS) CERT_AGENT_HYPOTHESIS_EXAMPLES=$(SOAK_EXAMPLES) \
		$(BIN)/pytest -q -s tests/test_crash_trials.py tests/test_target_properties.py \
		tests/test_pod_info_properties.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: $(STAMP)
	PYTHON=$(BIN)/python proto/generate.sh

dashboard: $(STAMP)
	$(BIN)/python deploy/grafana/dashboard.py > deploy/grafana/cert-agent.json

bench: $(STAMP)
	$(BIN)/python -m tests.bench_agent --output docs/benchmarks.md --scale-output docs/scale.md

bench-quick: $(STAMP)
	mkdir -p /tmp/bench
	$(BIN)/python -m tests.bench_agent --quick --output /tmp/bench/benchmarks.md --scale-output /tmp/bench/scale.md

IMAGE ?= ghcr.io/csi-cert-agent/cert-agent
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PYTHON_IMAGE ?= python:3.11-slim-bookworm
# Bases made here with debootstrap when no registry is reachable (deploy/image/make-base.sh).
LOCAL_BASE ?= local/python:3.11-bookworm-minbase
LOCAL_BUILDER ?= local/python:3.11-bookworm-build

# With a registry: the official Python image, pulled fresh. Without one (docker pull fails):
# the local bases (docs/image.md).
image:
	@if docker pull -q $(PYTHON_IMAGE) >/dev/null 2>&1; then \
		echo docker build --pull -t $(IMAGE):$(VERSION) .; \
		docker build --pull -t $(IMAGE):$(VERSION) .; \
	else \
		echo "cannot pull $(PYTHON_IMAGE): building on the local bases (make image-local)"; \
		$(MAKE) --no-print-directory image-local; \
	fi

image-base:
	BASE_IMAGE=$(LOCAL_BASE) BUILDER_IMAGE=$(LOCAL_BUILDER) deploy/image/make-base.sh

image-local:
	docker image inspect $(LOCAL_BASE) $(LOCAL_BUILDER) >/dev/null 2>&1 || $(MAKE) image-base
	docker build --network host --build-arg PYTHON_IMAGE=$(LOCAL_BASE) \
		--build-arg BUILDER_IMAGE=$(LOCAL_BUILDER) -t $(IMAGE):$(VERSION) .

# Run the built image for real: publish a volume through its socket, openssl, SIGTERM (root).
image-smoke: $(STAMP)
	deploy/image/smoke-test.sh $(IMAGE):$(VERSION)

demo: $(STAMP)
	$(BIN)/python -m agent.demo

clean:
	@# Mounts outlive the agent on purpose (pods keep their files across restarts); drop ours.
	-grep -o " $(RUN_DIR)[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .mypy_cache .ruff_cache
