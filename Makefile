# make demo   - set up .venv, build the kernels, run the offline imbalanced benchmark (real data)
# make test   - set up .venv, build the kernels (CPU, and CUDA where nvcc is present), run the tests
#               (the CUDA kernels on the emulated CUDA device among them)
# make test-cuda-emulated - the CUDA kernels on the emulated CUDA device alone: its three builds,
#               tests/test_cuda.py (thread orders, poison bytes) and tests/test_emulator.py (injected
#               bugs, the sanitizer and race-check builds)
# make bench  - speed and memory: native kernels vs reference vs loops vs pytorch-metric-learning
# make cmake  - build the libtorch shared library with CMake (CPU torch in .venv-cpu) and test it
# make wheel  - a binary wheel in dist/, built against the torch in .venv (and tied to it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
# The CUDA kernels compile and link without a GPU wherever nvcc is installed.
FORCE_CUDA ?= $(shell test -x $(CUDA_HOME)/bin/nvcc && echo 1 || echo 0)
TORCH_CUDA_ARCH_LIST ?= 9.0
MAX_JOBS ?= 2
export CUDA_HOME FORCE_CUDA TORCH_CUDA_ARCH_LIST MAX_JOBS

.PHONY: setup build emulated test test-cuda-emulated demo bench wheel cmake clean

# The requirements of the extras named in $(2), read from pyproject.toml with the Python of the
# environment $(1) (3.11 or later, for tomllib).
extra_requirements = $$($(1)/python -c 'import sys, tomllib; \
  extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
  print(*sorted({r for name in sys.argv[1:] for r in extras[name]}))' $(2))

# torch and the extras' requirements, not crl-ops itself: the checkout is used in place, and
# `make build` compiles its kernels there.
$(BIN)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(call extra_requirements,$(BIN),test paper bench)
	touch $@

setup: $(BIN)/.ready

build: setup
	$(BIN)/python setup.py -q build_ext --inplace

# The emulated CUDA device's builds (tests/cuda_emulation.py), cached in build/cuda-emulation.
emulated: setup
	$(BIN)/python -m tests.cuda_emulation default sanitize racecheck

test: build emulated
	$(BIN)/python -m pytest -q tests examples/tests benchmarks/tests

test-cuda-emulated: build emulated
	$(BIN)/python -m pytest -q tests/test_cuda.py tests/test_emulator.py

demo: build
	$(BIN)/python examples/offline_benchmark.py

bench: build
	$(BIN)/python -m benchmarks

# The prebuilt extension compiled against the installed torch: the wheel runs with that exact
# torch build only (a torch extension's ABI is that of one torch build), as the last line says.
# Stale build/lib* folders would put modules deleted since into the wheel.
wheel: setup
	rm -rf build/lib* build/bdist*
	$(BIN)/pip wheel -q --no-build-isolation --no-deps -w dist .
	@$(BIN)/python -c 'import glob, os, platform, sys, torch; \
	  wheel = max(glob.glob("dist/crl_ops-*.whl"), key=os.path.getmtime); \
	  print(f"{wheel}: tied to torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version_info.major}.{sys.version_info.minor}, " \
	        f"{platform.system()} {platform.machine()}, CUDA architectures: $(if $(filter 1,$(FORCE_CUDA)),$(TORCH_CUDA_ARCH_LIST),none)")' 2>/dev/null

# libtorch users: CMake against the CPU wheel of torch (see CMakeLists.txt).
.venv-cpu/.ready:
	$(PYTHON) -m venv .venv-cpu
	.venv-cpu/bin/pip install -q --upgrade pip
	.venv-cpu/bin/pip install -q torch==2.13.0 $(call extra_requirements,.venv-cpu/bin,test)
	touch $@

cmake: .venv-cpu/.ready
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$(.venv-cpu/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build -j $(MAX_JOBS)
	CRL_OPS_LIBRARY=$$PWD/cmake-build/libcrl_ops.so .venv-cpu/bin/python -m pytest -q tests/test_native.py -k "cpu"

clean:
	rm -rf build cmake-build dist crl_ops/*.so crl_ops.egg-info
