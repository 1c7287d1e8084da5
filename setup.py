"""Builds crl-ops. The C++/CUDA sources (crl_ops/csrc) always ship in the package: without a
prebuilt extension, the first native use compiles them into torch's extension cache
(crl_ops/_build.py, docs/installing.md). The prebuilt extension `crl_ops._C` is built here too:

- CPU kernels whenever torch is importable at build time (`pip install --no-build-isolation .`,
  `make build`, `make wheel`);
- CUDA kernels too when a GPU and CUDA_HOME are present, or FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST
  picks the architectures);
- no extension when torch is not importable, as under pip's default build isolation, or with
  CRL_OPS_NATIVE=0 (or false, off, no).
"""
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = "crl_ops/csrc"  # relative: setuptools wants source paths relative to this directory


def load_build_module():
    """crl_ops/_build.py by path, for its source lists and flags, without importing crl_ops."""
    spec = importlib.util.spec_from_file_location("crl_ops_build", os.path.join(HERE, "crl_ops", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def native_extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("crl-ops: torch is not importable at build time; the native kernels will compile on first use "
              "(or use `pip install --no-build-isolation .` to build them now)", file=sys.stderr)
        return [], {}

    build = load_build_module()
    if build.native_disabled():  # CRL_OPS_NATIVE, checked as at run time
        return [], {}
    sources = build.core_sources(SOURCE_DIR) + [os.path.join(SOURCE_DIR, build.PYTHON_MODULE_SOURCE)]
    include_dirs = [os.path.join(HERE, SOURCE_DIR)]
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.cuda.is_available() and cuda_home is not None)
    extension = cpp_extension.CppExtension
    extra = {"cxx": build.CXX_FLAGS + [build.cxx_standard_flag()]}
    if with_cuda:
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but CUDA_HOME is not set and nvcc was not found")
        extension = cpp_extension.CUDAExtension
        sources += build.cuda_sources(SOURCE_DIR)
        include_dirs += build.cuda_wheel_include_dirs()
        extra["nvcc"] = build.NVCC_FLAGS
    ext = extension(
        name="crl_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=build.LINK_FLAGS,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
