# Two commands on a fresh machine:  `make book` (a preview of the whole book at profile cpu)  and  `make test`.
# `make publish` re-computes the published book (profile world) into book/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test publish install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU machines here carry torch 2.14.1 / torchvision 0.29.1 on local disk; pip takes them from there.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/rclip book --profile cpu

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

publish: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/rclip book --profile world --publish

clean:
	rm -rf _build
