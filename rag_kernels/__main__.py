"""Command line: ``rag-kernels <command>`` / ``python -m rag_kernels <command>``."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "compute every RAG loss and retriever objective on a small model, then co-train a few steps",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rag-kernels <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo

        return demo(rest)
    print(f"rag-kernels: unknown command {cmd!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
