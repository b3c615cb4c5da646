# Development targets for sd-webui-clora (run on the CPU; Python 3.10 or 3.11).
# PYTHON: the interpreter that creates .venv. Default: the first of python3.11,
# python3.10, python3 that runs and is 3.10 or 3.11 (else python3, which the
# version check then reports).
PYTHON ?= $(shell for p in python3.11 python3.10 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 11)))' \
	>/dev/null 2>&1 && command -v $$p && exit; done; command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIPLOG := $(VENV)/pip.log
OUT    ?= out/demo
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off --no-input

.PHONY: .venv test demo clean-venv

.venv: $(STAMP)

# pip's output goes to $(PIPLOG); it is shown only when pip fails.
$(STAMP): requirements-dev.txt requirements-nodeps.txt
	@hint=; if [ -x $(VPY) ]; then py=$(VPY); else py='$(PYTHON)'; fi; \
	ver=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	if [ -z "$$py" ]; then found="no python3 on PATH"; \
	elif [ -z "$$ver" ]; then found="$$py, which does not run"; \
	else found="$$ver at $$py"; fi; \
	case "$$ver" in \
	3.10|3.11) ;; \
	*) if [ "$$py" = $(VPY) ]; then hint="run make clean-venv, then "; fi; \
	   echo "sd-webui-clora needs Python 3.10 or 3.11 (found $$found); $${hint}run with PYTHON=/path/to/python3.11" >&2; \
	   exit 1;; \
	esac; \
	if [ ! -x $(VPY) ]; then \
	  "$$py" -m venv $(VENV) || { rm -rf $(VENV); \
	    echo "could not create $(VENV) with $$py -m venv (on Debian/Ubuntu: apt install python$$ver-venv)" >&2; exit 1; }; \
	fi
	@echo "installing the pinned dependencies into $(VENV) (a few minutes; log: $(PIPLOG))"; \
	{ $(VPY) -m pip install $(PIP_FLAGS) -r requirements-dev.txt && \
	  $(VPY) -m pip install $(PIP_FLAGS) --no-deps -r requirements-nodeps.txt; } >$(PIPLOG) 2>&1 || { \
	  echo "pip install failed; the last lines of $(PIPLOG):" >&2; \
	  tail -n 40 $(PIPLOG) >&2; exit 1; }
	@# torchvision must never get in (openai-clip declares it; requirements-nodeps.txt is --no-deps).
	@$(VPY) -c "import importlib.util as u, sys; \
	sys.exit('torchvision must not be installed in $(VENV)' if u.find_spec('torchvision') else 0)"
	@$(VPY) -c "import torch, transformers, ldm.modules.diffusionmodules.openaimodel, ldm.modules.attention, pydantic, pytorch_metric_learning, safetensors, einops, hypothesis, ruff" \
	|| { echo "the packages in $(VENV) do not import (see above)" >&2; exit 1; }
	@touch $@
	@echo "installed the development environment into $(VENV)"

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VPY) -m miniworld.demo --out $(OUT)

clean-venv:
	rm -rf $(VENV)
