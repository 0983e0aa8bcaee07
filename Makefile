# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Each bootstraps a local virtualenv first. Override the torch build with TORCH_SPEC=...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the one pinned Triton (setup.py's extras read the same file)
TRITON_SPEC ?= $(shell grep -v '^\#' requirements/triton.txt | head -1)
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdar-installed
REQS := $(wildcard requirements/*.txt)
# verl pins torch / transformers / vllm it does not need for its loss functions: installed with --no-deps
NODEPS_REQS := requirements/peers_nodeps.txt
ARGS ?=
# The compile gate compiles every bf16 kernel specialization for sm_90a and sm_80 (~1-3 min).
SDAR_COMPILE_GATE ?= full

.PHONY: install demo test bench clean-venv

# `make` installs the `sdar` command into $(VENV)/bin, which is not on PATH: call .venv/bin/sdar,
# or `source .venv/bin/activate` once per shell and then `sdar ...`.
install: $(STAMP)

# Everything: the project with every CPU extra (setup.py: all = engine + envs + bench), the pinned
# requirements and the peer libraries. TORCH_SPEC is passed again so no requirement can move torch.
# PYTHONWARNINGS: an editable install of mapped folders (envs/ -> sdar_envs, benchmarks/ ->
# sdar_benchmarks, on purpose) makes setuptools print a page-long "Editable installation" notice.
$(STAMP): setup.py pyproject.toml $(REQS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e ".[all,dev]" $(foreach f,$(filter-out $(NODEPS_REQS),$(REQS)),-r $(f)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps $(foreach f,$(NODEPS_REQS),-r $(f))
	touch $@

demo: install
	$(BIN)/sdar demo $(ARGS)

test: install
	SDAR_COMPILE_GATE=$(SDAR_COMPILE_GATE) TRITON_INTERPRET=1 $(BIN)/python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider $(ARGS)

bench: install
	$(BIN)/sdar bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
