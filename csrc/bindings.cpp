// Python module entry point for rag_kernels._C. The ops themselves are registered with
// the dispatcher (TORCH_LIBRARY_FRAGMENT in each kernel file) under torch.ops.rag_kernels,
// which is what makes them usable from torch.compile graphs. The module itself exposes the
// kernels' CPU dispatch state (vec_math.h, micro_gemm.h).
#include <torch/extension.h>

#include "micro_gemm.h"
#include "vec_math.h"

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
  namespace d = rag_kernels::detail;
  m.def("cpu_isa", [] { return std::string(d::isa_name(d::cpu_isa())); },
        "ISA of the epilogues: 'avx512', 'avx2' or 'default' (RAG_KERNELS_CPU_ISA lowers it)");
  m.def("detected_isa", [] { return std::string(d::isa_name(d::detected_isa())); },
        "The best ISA this CPU runs");
  m.def("set_cpu_isa", [](const std::string& name) { d::set_cpu_isa(name); },
        "Set the ISA ('auto', 'avx512', 'avx2', 'default'; capped at detected_isa())");
  m.def("cpu_has_bf16_matmul", &d::cpu_has_bf16_matmul,
        "The CPU has AVX512_BF16 or AMX-BF16 instructions");
  m.def("native_bf16_gemm", &d::native_bf16_gemm,
        "bf16 inputs run bf16 micro-kernel GEMMs with fp32 outputs (else they run in fp32)");
  m.def("fp32_micro_gemm", &d::fp32_micro_gemm,
        "fp32 (and converted 16-bit) inputs run micro-kernel GEMMs (else ATen's)");
  m.def("fp32_gemm", [] { return std::string(d::fp32_gemm_name()); },
        "The fp32 GEMM kernel: 'onednn' (AVX-512), 'avx2' (this project's) or 'aten'");
  m.def("cpu_gemm", [] { return std::string(d::gemm_mode_name(d::gemm_mode())); },
        "GEMM mode: 'auto', 'fp32' or 'aten' (RAG_KERNELS_CPU_GEMM)");
  m.def("set_cpu_gemm", [](const std::string& name) { d::set_cpu_gemm(name); },
        "Set the GEMM mode ('auto', 'fp32': no bf16 operands, 'aten': no micro-kernel)");
}
