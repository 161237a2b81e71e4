# The two commands a new user needs: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# Build with both cores by default; CUDA_HOME is resolved by setup.py.
export MAX_JOBS ?= 2

.PHONY: demo test test-fast lint format build venv cmake bench-cpu gpu-check clean

demo: build
	$(PY) -m fastpix2pix info
	$(PY) -m fastpix2pix demo
	@echo "Draw on it in the browser: $(PY) -m fastpix2pix serve --name demo   (then open http://127.0.0.1:8000/)"

test: build lint
	$(PY) -m pytest -q

test-fast: build
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" setuptools wheel
	$(PY) -m pip install -q numpy pillow tqdm matplotlib pytest pytest-benchmark pytest-timeout ruff import-linter ninja scikit-image selenium onnx onnxruntime onnxscript
	touch $@

# Rebuilds only what changed (ninja); the CUDA kernels are compiled whenever a toolkit is found.
build: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# The same library through CMake (for C++ developers and IDEs: build/cmake/compile_commands.json).
cmake: venv
	cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake

bench-cpu: build
	$(PY) -m pytest benchmarks/bench_cpu_ops.py --benchmark-only --benchmark-json=benchmarks/results/cpu_ops.json

# The prepared GPU check (benchmarks/gpu_check.py), for a lent GPU machine whose python3 has torch and
# nvcc. No arguments: the speed stage. STAGE=correctness or STAGE=quality: the others. Each stage stops
# within 470 s (one command of at most 10 minutes). DRY_RUN=1 lists a stage's steps with their estimates
# anywhere (STAGE=all: every stage).
GPU_PYTHON ?= python3
STAGE ?= speed
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --stage $(STAGE) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf build fastpix2pix/_C*.so *.egg-info
