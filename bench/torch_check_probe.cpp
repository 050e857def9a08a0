// Probe for the crash seen on the first GPU machine: a TORCH_CHECK whose message formats a number
// (c10::str -> std::string) ended in SIGSEGV there, while a literal-only message raised. Built by
// bench/torch_check_probe with each available compiler, it isolates the compiler from our code.
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

at::Tensor probe(const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(mode != 1, "probe: literal message");
  TORCH_CHECK(mode != 2, "probe: formatted message, mode=", mode, ", shape ", x.sizes());
  return x;
}

TORCH_LIBRARY(fastprune_probe, m) { m.def("probe(Tensor x, int mode) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastprune_probe, CPU, m) { m.impl("probe", &probe); }

static struct PyModuleDef probe_module = {PyModuleDef_HEAD_INIT, "torch_check_probe", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_torch_check_probe(void) { return PyModule_Create(&probe_module); }
