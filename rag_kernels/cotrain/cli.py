"""Command line: ``rag-kernels <command>`` / ``python -m rag_kernels <command>``.

* ``train``: co-train retriever and generator on the embedded default data (or --corpus /
  --train / --eval JSONL), printing and saving initial vs final metrics;
* ``eval``: evaluate the run in ``--output-dir`` with its saved configuration and
  checkpoint (eval options only; see :mod:`.eval.command`); writes predictions.jsonl;
* ``demo``: the RAG losses and retriever objectives (adist aside) on a small model.

Errors the user can fix (a bad option or config file, a missing or malformed input, a
refused checkpoint, a busy or unwritable output directory, a model path that does not
exist) print ONE line ``rag-kernels: error: <what is wrong>`` on stderr and exit 2;
``--debug`` adds the traceback. Any other exception is a bug and keeps its traceback.
Ctrl-C exits 130. Every option is validated before anything heavy (transformers, FAISS,
the models) is imported; ``train`` then locks the output directory before loading models.
"""

from __future__ import annotations

import os
import sys
import traceback

from .errors import UserError, one_line

COMMANDS = {
    "train": "co-train the retriever and the generator; prints initial vs final metrics",
    "eval": "evaluate retrieval (recall@k, MRR) and answers (EM, F1, ROUGE-L, BLEU, grounding)",
    "demo": "compute the RAG losses and retriever objectives (all but adist) on a small model",
}


def _train(argv: list[str]) -> int:
    from .training.config import build_parser, resolve_config
    from .training.files import RunLock

    args = build_parser("rag-kernels train", COMMANDS["train"]).parse_args(argv)
    cfg = resolve_config(args)  # validated: nothing heavy is imported before this returns
    # Under torchrun only rank 0 writes to the output directory, so only rank 0 locks it (a
    # lock per rank would make rank 1 fail on rank 0's lock). torchrun sets RANK.
    rank0 = os.environ.get("RANK", "0") == "0"
    lock = RunLock(cfg.output_dir).acquire() if rank0 else None
    from .training.loop import CoTrainer, finish_distributed

    ok = False
    try:
        trainer = CoTrainer(cfg, run_lock=lock)
        metrics = trainer.fit()
        ok = True
    finally:
        if lock is not None:
            lock.release(discard_unused=not ok)  # a failed first run leaves no empty directory
        finish_distributed(ok)
    if trainer.rank == 0 and "initial" in metrics:
        print("\nmetric      initial   final")
        from .eval.metrics import METRIC_KEYS

        for k in METRIC_KEYS:
            a, b = metrics["initial"].get(k), metrics["final"].get(k)
            fmt = lambda x: "     n/a" if x is None else f"{x:8.3f}"
            print(f"{k:10s} {fmt(a)} {fmt(b)}")
        print(
            f"outputs in {cfg.output_dir}/ (metrics.json, train_log.jsonl, curves.png, checkpoint.pt)"
        )
    return 0


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: rag-kernels <command> [options]   (rag-kernels <command> --help)\n\ncommands:"
        )
        for name, text in COMMANDS.items():
            print(f"  {name:6s} {text}")
        return 0 if argv else 2
    if argv[0] == "--version":
        from rag_kernels import __version__

        print(f"rag-kernels {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train(rest)
    if cmd == "eval":  # its own parser: evaluation options only, the rest from the run
        from .eval.command import main as evaluate

        return evaluate(rest)
    if cmd == "demo":
        from .demo import main as demo

        return demo([a for a in rest if a != "--debug"])
    raise UserError(f"unknown command {cmd!r}; choose from {', '.join(sorted(COMMANDS))}")


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"rag-kernels: error: {one_line(message)}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _run(argv)
    except UserError as e:
        return _fail(str(e), debug)
    except OSError as e:  # the environment (a path, the disk), not a bug
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or one_line(e)}", debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("rag-kernels: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
