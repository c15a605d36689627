# Both entry points build their own virtual environment; nothing else is needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench images clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/textpoke demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py
	$(PY) bench/bench_boot.py

# Rebuild the bundled guest images (needs GNU as/ld).
images: $(STAMP)
	$(PY) -m textpoke.images.build

clean:
	rm -rf $(VENV) build src/*.egg-info
