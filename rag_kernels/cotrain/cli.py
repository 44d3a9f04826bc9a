"""Command line: ``rag-kernels <command>`` / ``python -m rag_kernels <command>``.

* ``train``: co-train retriever and generator on the embedded default data (or --corpus /
  --train / --eval JSONL), printing and saving initial vs final metrics;
* ``eval``: evaluate the models (from ``--output-dir``'s checkpoint with ``--resume``);
* ``demo``: every RAG loss and retriever objective on a small model.
"""

from __future__ import annotations

import json
import os
import sys

COMMANDS = {
    "train": "co-train the retriever and the generator; prints initial vs final metrics",
    "eval": "evaluate retrieval (recall@k, MRR) and answers (EM, F1, ROUGE-L, BLEU, grounding)",
    "demo": "compute every RAG loss and retriever objective on a small model",
}


def _train(argv: list[str], evaluate_only: bool) -> int:
    from .training import CoTrainer, build_parser, resolve_config

    prog = "rag-kernels " + ("eval" if evaluate_only else "train")
    args = build_parser(prog, COMMANDS["eval" if evaluate_only else "train"]).parse_args(argv)
    cfg = resolve_config(args)
    trainer = CoTrainer(cfg)
    if evaluate_only:
        trainer.refresh_index()
        ckpt = os.path.join(cfg.output_dir, "checkpoint.pt")
        if cfg.resume and os.path.exists(ckpt):
            trainer.load_checkpoint(ckpt)
        m = trainer.evaluate(trainer.data.test)
        trainer._report("eval", m)
        print(json.dumps(m))
        return 0
    metrics = trainer.fit()
    if trainer.rank == 0 and "initial" in metrics:
        print("\nmetric      initial   final")
        for k in ("recall@1", "recall@5", "recall@20", "mrr@10", "em", "f1", "rougeL", "bleu", "grounding"):
            a, b = metrics["initial"].get(k), metrics["final"].get(k)
            fmt = lambda x: "     n/a" if x is None else f"{x:8.3f}"
            print(f"{k:10s} {fmt(a)} {fmt(b)}")
        print(f"outputs in {cfg.output_dir}/ (metrics.json, train_log.jsonl, curves.png, checkpoint.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rag-kernels <command> [options]   (rag-kernels <command> --help)\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:6s} {text}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("train", "eval"):
        return _train(rest, evaluate_only=cmd == "eval")
    if cmd == "demo":
        from .demo import main as demo

        return demo(rest)
    print(f"rag-kernels: unknown command {cmd!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
