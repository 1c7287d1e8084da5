"""Builds the optional native extension `crl_ops._C` (csrc/) next to the pure-Python package.

- CPU kernels whenever torch is importable at build time (`pip install --no-build-isolation .`);
- CUDA kernels too when a GPU and CUDA_HOME are present, or FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST
  picks the architectures);
- no extension (pure PyTorch, still fully working) when torch is not importable, as under
  pip's default build isolation, or with CRL_OPS_NATIVE=0.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    if os.environ.get("CRL_OPS_NATIVE", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("crl-ops: torch is not importable at build time; installing without native kernels "
              "(use `pip install --no-build-isolation .` to build them)", file=sys.stderr)
        return [], {}

    sources = ["crl_ops/csrc/ops.cpp", "crl_ops/csrc/python_module.cpp", "crl_ops/csrc/cpu/crl_cpu.cpp"]
    include_dirs = [os.path.join(HERE, "crl_ops", "csrc")]
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.cuda.is_available() and cuda_home is not None)
    extension = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}
    if with_cuda:
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but CUDA_HOME is not set and nvcc was not found")
        extension = cpp_extension.CUDAExtension
        sources += ["crl_ops/csrc/cuda/crl_cuda.cpp", "crl_ops/csrc/cuda/crl_kernels.cu"]
        # The CUDA wheel of torch ships the CUDA library headers (cuBLAS, ...) that torch's own
        # headers include; a plain toolkit install has them under CUDA_HOME already.
        for site in sys.path:
            include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        # --fmad=false: distances round exactly as in the CPU kernels (no fused multiply-add).
        extra["nvcc"] = ["-O3", "--fmad=false", "-std=c++17", "-lineinfo"]
    ext = extension(
        name="crl_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
