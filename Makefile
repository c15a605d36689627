# Both entry points build their own virtual environment; nothing else is needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench images clean test-kernel kernel-images

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

# Debian's kernels (apt-get download, cached in ~/.cache/textpoke/kernel) and their
# reference dumps under QEMU (cached in ~/.cache/textpoke/reference).  KERNELS picks
# them: 6.12-cloud, 6.12-rt, 6.12-amd64, 6.1-cloud, 6.1-amd64, all, or releases.
KERNELS ?= 6.12-cloud,6.12-rt,6.1-cloud
kernel-images: $(STAMP)
	$(PY) tools/kernel_reference.py --kernel $(KERNELS) --fetch-only
	$(PY) tools/kernel_reference.py --kernel $(KERNELS) --no-compare > /dev/null

# Opt-in: boots QEMU.  Each kernel's own patching around alternative_instructions()
# for several CPU models and command lines, and textpoke's dump against it: one table.
# The run-time references (6.12 cloud; ftrace, kprobes, static keys, modules, step by
# step, three CPU setups) are built first: their column sits on the same rows.
test-kernel: kernel-images
	TEXTPOKE_KERNEL_TESTS=1 TEXTPOKE_KERNELS=$(KERNELS) $(PY) -m pytest -q tests/test_real_image.py tests/test_kallsyms.py tests/test_qemu_reference.py tests/test_runtime_reference.py
	$(PY) tools/kernel_runtime_reference.py --setup all --quiet --no-table
	$(PY) tools/kernel_reference.py --kernel $(KERNELS) --no-data

clean:
	rm -rf $(VENV) build src/*.egg-info
