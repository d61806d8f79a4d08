# Two entry points, each doing all set-up itself on a fresh machine:
#   make run   - the main job on embedded defaults
#   make test  - the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PIN     = -c constraints.txt
STAMP   = $(VENV)/.installed

.PHONY: install run test moto-server clean-venv

install: $(STAMP)

# Rebuilt when the dependency declarations change. The mmcv source build lands in pip's
# wheel cache, so only the first install on a machine pays its ~11 minutes.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(PIN) "pip>=24" "setuptools<81" wheel
	$(PIP) install --quiet $(PIN) torch==2.13.0 "numpy<2"
	MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install $(PIN) --no-build-isolation mmcv==2.1.0
	$(PIP) install --quiet $(PIN) --no-deps mmdet3d==1.4.0
	$(PIP) install --quiet $(PIN) --no-build-isolation -e ".[cpu,test]"
	touch $(STAMP)

run: install
	$(VENV)/bin/bevfusion-ptq run

test: install
	$(VENV)/bin/python -m pytest

# A local S3 (moto, in memory) on 127.0.0.1:5000 for trying `run --output s3://...`.
moto-server: install
	$(VENV)/bin/python -m moto.server -H 127.0.0.1 -p 5000

clean-venv:
	rm -rf $(VENV)
