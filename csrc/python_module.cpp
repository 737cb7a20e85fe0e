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

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&bao_fast_c_module);
}
