"""Tier 1: the kernels. One folder per op, every folder the same shape (docs/design.md §4):

* ``__init__.py`` — math docstring with gradients, the options dataclass, the autograd
  Function of the fused kernels, ``validate_*``, the unchecked ``*_core`` and the public function;
* ``reference.py`` — plain PyTorch, materialising, float64-capable: the readable ground truth;
* ``cpu.py`` — binding of the compiled C++ kernels (csrc/), with ``register_fake`` for torch.compile;
* ``triton.py`` — the GPU kernels (CPU tensors under ``TRITON_INTERPRET=1``).

Shared modules: :mod:`.registry` (which implementation runs), :mod:`.validation` (checks,
value checks, autocast), :mod:`.triton_utils` (device helpers), :mod:`.distributed`
(collectives with gradient). Nothing here imports from above ``ops/``.
"""
