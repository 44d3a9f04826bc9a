"""One folder per op: math docstring, reference.py, cpu.py (C++ binding), triton.py, and the
autograd.Function + public function in the folder's __init__."""
