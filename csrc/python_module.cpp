// Python entry point of the bao_fast._C extension. Importing it loads the shared library, whose static
// TORCH_LIBRARY registrations make the ops available as torch.ops.bao_fast.*. Built only by setup.py
// (the CMake build links the ops without Python).
#include <Python.h>

namespace {

PyModuleDef bao_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "bao_fast C++/CUDA ops, registered as torch.ops.bao_fast.* on import.",
    -1,
    nullptr,
};

}  // namespace

// `_C.openmp`: whether the ops were compiled with OpenMP, without which at::parallel_for (header code under
// torch's OpenMP backend) silently runs on one thread.
PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&bao_fast_c_module);
#ifdef _OPENMP
  PyObject* openmp = Py_True;
#else
  PyObject* openmp = Py_False;
#endif
  if (module != nullptr && PyModule_AddObjectRef(module, "openmp", openmp) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
