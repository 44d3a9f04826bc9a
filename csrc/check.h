// Argument checks shared by the C++ kernels (flash-attention style). The Python layer
// validates user input with friendly messages; these guard the op boundary itself so a
// direct torch.ops call can never read memory it should not.
#pragma once
#include <torch/extension.h>

#define RK_CHECK_CPU(x) TORCH_CHECK(!(x).is_cuda(), #x " must be a CPU tensor")
#define RK_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define RK_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got ", (x).dim())
#define RK_CHECK_SHAPE(x, ...)                                               \
  TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}), #x " must have shape (" \
              #__VA_ARGS__ "), got ", (x).sizes())
#define RK_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define RK_CHECK_INPUT(x) \
  RK_CHECK_CPU(x);        \
  RK_CHECK_CONTIGUOUS(x)
