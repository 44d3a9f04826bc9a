"""NumPy >= 2.4 support for the interpreter of Triton < 3.9 (``TRITON_INTERPRET=1``).

Triton 3.6's interpreter turns a scalar kernel argument into a Python int with ``int(arr)``
of its 1-element array (e.g. ``range(0, T, BLOCK_T)`` over a runtime ``T``), which NumPy
>= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9
squeezes the array first. :func:`install` does the same on older Triton. Called by
tests/conftest.py, tests/toolkit.py (spawned distributed workers import it, not the
conftest) and tests/fuzz_worker.py (its own process).
"""

from __future__ import annotations

import os


def install() -> None:
    """Patch the interpreter's ``tl.tensor.__index__`` (undone with its other patches after
    each launch); nothing without the interpreter, without triton, or when already done."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except Exception:  # no triton: its tests skip
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_rk_squeeze_index", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch._rk_squeeze_index = True
    interpreter._patch_lang_tensor = patch
