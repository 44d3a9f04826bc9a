// Argument checks shared by the C++ kernels (flash-attention style). The Python layer
// validates user input with friendly messages; these guard the op boundary itself so a
// direct torch.ops call can never read memory it should not. Every macro is one statement
// (do { ... } while (0)), so it is safe in an unbraced if / else.
#pragma once
#include <torch/extension.h>

#define RK_CHECK_CPU(x)                                                                 \
  do {                                                                                  \
    TORCH_CHECK(!(x).is_cuda(), #x " must be a CPU tensor");                            \
  } while (0)
#define RK_CHECK_CONTIGUOUS(x)                                                          \
  do {                                                                                  \
    TORCH_CHECK((x).is_contiguous(), #x " must be contiguous");                         \
  } while (0)
#define RK_CHECK_DIM(x, d)                                                              \
  do {                                                                                  \
    TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got ",           \
                (x).dim());                                                             \
  } while (0)
#define RK_CHECK_SHAPE(x, ...)                                                          \
  do {                                                                                  \
    TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}),                       \
                #x " must have shape (" #__VA_ARGS__ "), got ", (x).sizes());           \
  } while (0)
#define RK_CHECK_DTYPE(x, dt)                                                           \
  do {                                                                                  \
    TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ",      \
                (x).scalar_type());                                                     \
  } while (0)
#define RK_CHECK_INPUT(x)                                                               \
  do {                                                                                  \
    RK_CHECK_CPU(x);                                                                    \
    RK_CHECK_CONTIGUOUS(x);                                                             \
  } while (0)
