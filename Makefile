# Development targets for sd-webui-clora (CPU only).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/demo
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off

.PHONY: .venv test demo clean-venv

.venv: $(STAMP)

$(STAMP): requirements-dev.txt requirements-nodeps.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	$(VPY) -m pip install $(PIP_FLAGS) --no-deps -r requirements-nodeps.txt
	@# Guard: the CPU wheel only; a CUDA torch or torchvision must never get in.
	$(VPY) -c "import importlib.util as u, torch, sys; \
	sys.exit('CUDA torch installed: ' + torch.__version__ if torch.version.cuda else \
	('torchvision must not be installed' if u.find_spec('torchvision') else 0))"
	$(VPY) -c "import transformers, ldm.modules.diffusionmodules.openaimodel, ldm.modules.attention, pydantic, pytorch_metric_learning, safetensors, einops, hypothesis"
	touch $@

test: $(STAMP)
	$(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VPY) -m miniworld.demo --out $(OUT)

clean-venv:
	rm -rf $(VENV)
