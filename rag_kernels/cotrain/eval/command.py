"""``rag-kernels eval``: evaluate a trained run, with the run's own configuration.

The run is ``--output-dir``: its configuration comes from ``<output-dir>/config.json``
(written by ``rag-kernels train``; for a run without one yet, e.g. interrupted, the
configuration recorded in its checkpoint), its weights from ``<output-dir>/checkpoint.pt``
(or ``--checkpoint PATH``). Everything that shapes the models and the answers comes from the
run: the models, ``--docs`` (K), ``--mode``, the prompt, the seeds, the data the tiny models
were fitted on; eval accepts only the options of :data:`EVAL_OPTIONS`, each overriding the
run's value, and refuses every training option with a usage error (exit 2) naming it
(``--dev`` too: eval scores ``--eval``, the dev split is the training's ``--eval-every``
selection data, and the run's ``--dev`` file is not read).

* ``--resume`` / ``--checkpoint PATH``: the checkpoint must exist (else an error naming the
  missing file); without them an existing ``checkpoint.pt`` is loaded all the same, and a run
  with none evaluates the untrained models, saying so;
* one line on stdout says what was loaded (configuration, checkpoint and its step, models,
  K, mode, decoding); then the metrics (one line ``[eval] ...``, then the metrics as JSON);
* ``<output-dir>/predictions.jsonl`` gets one line per evaluated question (see
  :mod:`.predictions`), ``<output-dir>/metrics.json`` an ``"eval"`` entry (the training's
  ``initial`` / ``final`` entries are kept); the output directory is locked meanwhile.

Seeds are not eval options: ``--seed`` builds the tiny-random models (and the frozen weights
are rebuilt from it) and ``--data-seed`` selects the embedded corpus, so both must be the
run's; decoding is greedy, so nothing else draws random numbers.

Stdlib only at import (options are validated before anything heavy is imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..errors import ArgumentParser, UserError, one_line, warn
from ..training.config import (
    BadOptionValue,
    TrainConfig,
    absolute_paths,
    coerce_value,
    field_kinds,
    flag_name,
    parse_bool,
    validate,
)

__all__ = ["EVAL_OPTIONS", "build_eval_parser", "main", "parse_eval_args", "run_config"]

# TrainConfig fields that `rag-kernels eval` accepts (each overrides the run's value).
EVAL_OPTIONS = (
    "output_dir",
    "eval",
    "eval_limit",
    "eval_batch_size",
    "eval_decoding",
    "max_new_tokens",
    "progress",
)
CONFIG_JSON = "config.json"
CHECKPOINT = "checkpoint.pt"  # loop.CHECKPOINT (not imported: loop.py is heavy)
METRICS = "metrics.json"


_HELP = {
    "output_dir": f"the run to evaluate: its {CONFIG_JSON} and {CHECKPOINT} (default: {{default}})",
    "eval": "evaluation QA JSONL (default: the run's --eval, else the embedded test split)",
}


def build_eval_parser(prog: str = "rag-kernels eval", description: str | None = None):
    """The parser of ``rag-kernels eval``: :data:`EVAL_OPTIONS` (from the TrainConfig
    fields), ``--checkpoint``, ``--resume`` and ``--debug``."""
    ap = ArgumentParser(
        prog=prog,
        description=description
        or (
            "Evaluate the run in --output-dir with the configuration it was trained with "
            "(its config.json) and its checkpoint; options below override the run's values, "
            "training options are refused."
        ),
    )
    ap.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of errors too",
    )
    kinds = field_kinds()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in EVAL_OPTIONS:
        f, (base, _) = fields[name], kinds[name]
        text = _HELP.get(name) or f"{f.metadata['help']} (default: the run's)"
        kw: dict = {"help": text.format(default=f.default), "default": argparse.SUPPRESS}
        if base is bool:
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            kw["type"] = base
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        ap.add_argument(flag_name(name), **kw)
    ap.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"the checkpoint to evaluate (default: <output-dir>/{CHECKPOINT}); must exist",
    )
    ap.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=parse_bool,
        metavar="BOOL",
        default=False,
        help=f"require <output-dir>/{CHECKPOINT} (an error if it is missing)",
    )
    return ap


@dataclasses.dataclass
class EvalRequest:
    output_dir: str
    checkpoint: str
    require_checkpoint: bool
    checkpoint_given: bool  # --checkpoint PATH (else <output-dir>/checkpoint.pt)
    overrides: dict  # eval option -> value given on the command line


def _training_flags(extras: list[str]) -> tuple[list[str], list[str]]:
    """``(training flags, other unrecognised arguments)`` among argparse's leftovers."""
    accepted = {flag_name(n) for n in EVAL_OPTIONS}
    training = [flag_name(f.name) for f in dataclasses.fields(TrainConfig)]
    training = [f for f in training if f not in accepted] + ["--config", "--resume-force"]
    found, other = [], []
    after_flag = False
    for tok in extras:
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            match = [f for f in training if f == name] or [
                f for f in training if f.startswith(name)
            ]
            if len(match) == 1:
                if match[0] not in found:
                    found.append(match[0])
                after_flag = "=" not in tok
                continue
        if after_flag and not tok.startswith("--"):
            after_flag = False  # the value of a refused training flag
            continue
        after_flag = False
        other.append(tok)
    return found, other


def parse_eval_args(argv: list[str]) -> EvalRequest:
    """Parse and validate the eval options (a UserError otherwise): the values of eval
    options first, then refused training options, then unknown arguments."""
    ap = build_eval_parser()
    args, extras = ap.parse_known_args(argv)
    given = vars(args)
    overrides = {k: v for k, v in given.items() if k in EVAL_OPTIONS}
    validate(TrainConfig(**overrides))  # the eval options' values (the rest: defaults)
    found, other = _training_flags(extras)
    out = overrides.get("output_dir", TrainConfig.output_dir)
    if found:
        names = ", ".join(flag_name(n) for n in EVAL_OPTIONS) + ", --checkpoint, --resume"
        raise UserError(
            f"eval does not take training options: {', '.join(found)} (it evaluates the run "
            f"in --output-dir with the options saved in {os.path.join(out, CONFIG_JSON)}; "
            f"eval options: {names}; see rag-kernels eval --help)"
        )
    if other:
        raise UserError(f"unrecognized arguments: {' '.join(other)}")
    if "checkpoint" in given and not str(given["checkpoint"]).strip():
        raise UserError("--checkpoint '': must not be empty")
    checkpoint = given.get("checkpoint") or os.path.join(out, CHECKPOINT)
    return EvalRequest(
        output_dir=out,
        checkpoint=checkpoint,
        require_checkpoint=bool(given.get("resume")) or "checkpoint" in given,
        checkpoint_given="checkpoint" in given,
        overrides=overrides,
    )


def _values_from(source: str, data) -> tuple[dict, dict]:
    """Coerced TrainConfig values of a run's saved configuration (a UserError naming
    ``source`` for an unknown option or a value of the wrong type)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object of options, got {type(data).__name__}")
    kinds = field_kinds()
    values, sources = {}, {}
    for k, v in data.items():
        if k not in kinds:
            raise UserError(
                f"{source}: unknown option {k!r} (written by another version of rag-kernels?)"
            )
        kind, optional = kinds[k]
        try:
            values[k] = coerce_value(kind, optional, v)
        except BadOptionValue as e:
            raise UserError(f"{source}: {k}: {e}") from None
        sources[k] = source
    return values, sources


def run_config(req: EvalRequest) -> tuple[TrainConfig, str]:
    """The configuration to evaluate with: the run's (``config.json``, else the checkpoint's
    record) with the eval overrides; and where the run's part came from."""
    from ..training.files import read_bytes

    out = req.output_dir
    if req.require_checkpoint and not os.path.lexists(req.checkpoint):
        flag = "--checkpoint" if req.checkpoint_given else "--resume"
        raise UserError(
            f"{flag}: no checkpoint {req.checkpoint} (nothing to evaluate: train the run "
            f"first with rag-kernels train --output-dir {out})"
        )
    if not os.path.isdir(out):
        raise UserError(
            f"--output-dir {out}: no such directory: no run to evaluate (train one with "
            f"rag-kernels train --output-dir {out})"
        )
    path = os.path.join(out, CONFIG_JSON)
    if os.path.lexists(path):
        raw = read_bytes(path)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UserError(f"{path}: not valid JSON ({one_line(e)[:160]})") from None
        source = path
    elif os.path.lexists(req.checkpoint):
        from ..training.checkpoint import read_checkpoint

        data = read_checkpoint(req.checkpoint)["config"]
        source = f"{req.checkpoint} (its recorded configuration; no {CONFIG_JSON})"
    else:
        raise UserError(
            f"--output-dir {out}: no run to evaluate: neither {path} nor {req.checkpoint} "
            f"exists (train one with rag-kernels train --output-dir {out})"
        )
    values, sources = _values_from(source, data)
    values.update(req.overrides)
    for k in req.overrides:
        sources.pop(k, None)
    # eval scores --eval; the run's dev file (--dev, for --eval-every) is not read, so a dev
    # file moved since training is no error
    values.update(output_dir=out, resume=False, resume_force=False, dev=None)
    return absolute_paths(validate(TrainConfig(**values), sources)), source


def _model_name(value: str | None, default: str) -> str:
    return value if value is not None else default


def main(argv: list[str]) -> int:
    """``rag-kernels eval ARGS``: returns the exit status (errors raise UserError)."""
    req = parse_eval_args(argv)
    cfg, source = run_config(req)
    from ..training.files import RunLock

    # Under torchrun only rank 0 writes (predictions, metrics), so only rank 0 locks the run:
    # a lock per rank made every other rank fail on rank 0's. torchrun sets RANK.
    rank0 = os.environ.get("RANK", "0") == "0"
    lock = RunLock(cfg.output_dir).acquire() if rank0 else None
    from ..training.loop import finish_distributed

    ok = False
    try:
        code = _evaluate(cfg, source, req, lock)
        ok = True
        return code
    finally:
        if lock is not None:
            lock.release()
        finish_distributed(ok)


def _evaluate(cfg: TrainConfig, source: str, req: EvalRequest, lock) -> int:
    from ..training.files import atomic_write
    from ..training.loop import CoTrainer, read_metrics
    from .predictions import PREDICTIONS, write_predictions

    trainer = CoTrainer(cfg, for_eval=True, run_lock=lock)
    trainer.refresh_index()
    have = os.path.lexists(req.checkpoint)
    if have:
        trainer.load_checkpoint(req.checkpoint)
        what = f"checkpoint {req.checkpoint} (step {trainer.step})"
    else:
        what = "no checkpoint (the untrained models)"
    gen = _model_name(cfg.generator, "SmolLM2-135M-Instruct")
    ret = _model_name(cfg.retriever, "all-MiniLM-L6-v2")
    if trainer.rank == 0:
        print(
            f"eval: loaded {source} and {what}: generator {gen}, retriever {ret}, "
            f"K={cfg.docs}, mode {cfg.mode}, decoding {cfg.eval_decoding}",
            flush=True,
        )
        if not have:
            warn(f"{req.checkpoint} does not exist: evaluating the untrained models")
    m = trainer.evaluate(trainer.data.test)
    trainer._report("eval", m)
    if trainer.rank == 0:
        write_predictions(os.path.join(cfg.output_dir, PREDICTIONS), trainer.last_predictions)
        path = os.path.join(cfg.output_dir, METRICS)
        metrics = read_metrics(path) if os.path.lexists(path) else {}
        metrics["eval"] = m | {
            "step": trainer.step if have else 0,
            "checkpoint": req.checkpoint if have else None,
            "decoding": cfg.eval_decoding,
        }
        text = json.dumps(metrics, indent=2)
        atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
        print(json.dumps(m), flush=True)
        sys.stdout.flush()
    return 0
