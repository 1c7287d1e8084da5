// Makes the shared library importable as the Python module crl_ops._C; importing it runs the
// static TORCH_LIBRARY registrations. (The CMake build for libtorch users leaves this out and
// is loaded with torch.ops.load_library.)
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "crl_ops native kernels", -1, nullptr};
  return PyModule_Create(&module);
}
