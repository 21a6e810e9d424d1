# Two entry points, each installs what it needs into .venv first:
#   make train   -> FastTD3 + LoRA critic learning a DMC task on the CPU in minutes (experiment=cpu_demo)
#   make test    -> the test suite (Triton kernels run in the interpreter on CPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the 2.13.0 CPU wheel; on a CUDA workstation set TORCH_SPEC / TORCH_INDEX to taste.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=

.PHONY: train test install plots
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

train: install
	$(PY) -m fasttd3_lora.train experiment=cpu_demo $(ARGS)

plots: install
	$(PY) scripts/make_plots.py
