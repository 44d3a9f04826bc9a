"""``python -m rag_kernels <command>``: the co-training app's command line (cotrain/cli.py)."""

from rag_kernels.cotrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
