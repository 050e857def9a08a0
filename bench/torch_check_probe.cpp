// Probe for the crash seen on the first GPU machine: a TORCH_CHECK whose message formats a number
// (c10::str -> std::string) ended in SIGSEGV there, while a literal-only message raised. Built by
// bench/torch_check_probe with each available compiler, it isolates the compiler from our code.
// Modes: 1 literal TORCH_CHECK; 2 formatted TORCH_CHECK (c10::str); 3 a std::runtime_error with a
// std::string built here (no c10 formatting); 4 the message formatted into a char buffer with
// snprintf, then a literal-style TORCH_CHECK (no std::string in this library: a workaround).
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <cstdio>
#include <stdexcept>
#include <string>

at::Tensor probe(const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(mode != 1, "probe: literal message");
  TORCH_CHECK(mode != 2, "probe: formatted message, mode=", mode, ", shape ", x.sizes());
  if (mode == 3) throw std::runtime_error("probe: std::string message, mode=" + std::to_string(mode));
  if (mode == 4) {
    char msg[128];
    std::snprintf(msg, sizeof msg, "probe: snprintf message, mode=%lld, dim %lld", static_cast<long long>(mode),
                  static_cast<long long>(x.dim()));
    TORCH_CHECK(false, msg);
  }
  return x;
}

TORCH_LIBRARY(fastprune_probe, m) { m.def("probe(Tensor x, int mode) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastprune_probe, CPU, m) { m.impl("probe", &probe); }

static struct PyModuleDef probe_module = {PyModuleDef_HEAD_INIT, "torch_check_probe", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_torch_check_probe(void) { return PyModule_Create(&probe_module); }
