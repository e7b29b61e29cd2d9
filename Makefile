# medmm: two commands. `make demo` runs the main job end to end; `make test` runs the test suite.
# Both create .venv when it is missing (torch first, from the pinned builds, then medmm in editable mode).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.medmm-installed
TORCH   := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# two pytest-xdist workers: 2-rank DeepSpeed jobs one after another on one, the rest beside them (tests/conftest.py);
# XDIST= runs the suite in one process
XDIST   ?= -n auto --dist loadgroup --no-loadscope-reorder

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv system-deps demo test test-fast bench bench-long lint clean gpu-check

venv: $(STAMP)

# Orthanc + DICOMweb plugin, dcmtk, java, a C compiler, chromium: installed from Debian when root (or
# password-less sudo), otherwise one line says the command to run. See scripts/system-deps.sh.
system-deps:
	bash scripts/system-deps.sh

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: system-deps $(STAMP)
	$(VENV)/bin/medmm demo --out runs/demo

test: system-deps $(STAMP)
	$(VPY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest $(XDIST) -m "not slow and not deepspeed and not integration" $(PYTEST_ARGS)

# The side-by-side benchmarks that take minutes on a 2-core CPU. Longer ones run alone:
# bench-long = retrieval (full ICD-10-CM index), data_stream (1M records), moleculenet (5 datasets x seeds).
bench: $(STAMP)
	for b in train_step decoding dicom_load wsi_tiles molecules serve packing dpo_step zero3_save; do $(VPY) bench/$$b.py || exit 1; done

bench-long: $(STAMP)
	for b in retrieval data_stream moleculenet; do $(VPY) bench/$$b.py || exit 1; done

# bf16 training (~1B Llama + ViT, SDPA, gradient checkpointing, ZeRO-2) and decoding on one CUDA GPU -> tokens/s, MFU
# (bench/results/gpu_check.json); DRY_RUN=1 runs the same script on the CPU at tiny size.
gpu-check: $(STAMP)
	$(VPY) bench/gpu_check.py $(if $(DRY_RUN),--dry-run,)

lint: $(STAMP)
	$(VENV)/bin/ruff check medmm encoders tests bench train.py infer.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
