// Python module entry point for rag_kernels._C. The ops themselves are registered with
// the dispatcher (TORCH_LIBRARY_FRAGMENT in each kernel file) under torch.ops.rag_kernels,
// which is what makes them usable from torch.compile graphs.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(rag_kernels, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rag_kernels compiled CPU kernels (ops live under torch.ops.rag_kernels)";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
