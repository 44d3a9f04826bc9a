"""The co-training loop: retrieve top-K, generator loss through the fused RAG loss, retriever
objective from the generator's feedback, combined by ``CoTrainingLoss``.

One training step, in the order the code runs it (``CoTrainer.train_step``):

1. encode the questions with the (trainable) query encoder; search the FAISS index for
   ``rerank * K`` candidates with the detached query vectors (under torchrun each rank
   holds 1/world of the corpus and the search is collective, ``--index-shards``; see
   ``retrieval/index.py``); score them
   ``s = score_scale * q . d`` (differentiable in q) and keep the top K;
2. format (document, question) prompts with the answer as target, left-padded so the
   answer occupies the same positions for the K documents of a question;
3. last-layer hidden states + the LM-head weight -> ``rk.rag_loss`` (no logits);
4. the retriever objective (``--retriever-objective``) from ``rk.generator_feedback``
   (detached); ``rag`` uses the RAG loss's own gradient to the doc scores instead;
5. ``CoTrainingLoss`` combines both; backward; gradient all-reduce across ranks when run
   under ``torchrun``; clipping; AdamW step with separate learning rates.

With ``--fsdp`` (under torchrun) the generator and the trained query encoder are sharded by
FSDP2 instead of replicated: steps 2-4's generator work (hidden states, the RAG loss,
the feedback) runs as one FSDP forward method of the generator, so its root unit (embeddings,
LM head) is gathered for it, and FSDP reduce-scatters (averages) the sharded gradients; the
clipping is DTensor-aware, and checkpoints hold full tensors (docs/design.md §2.9).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

import rag_kernels as rk
from rag_kernels.integrations import fsdp as rk_fsdp
from rag_kernels.losses import retriever as R
from rag_kernels.losses.cotraining import CoTrainingLoss

from ..errors import UserError, one_line, warn
from ..eval.predictions import prediction_record
from ..models import (
    build_generator_batch,
    build_seq2seq_generator_batch,
    encoder_prompt_ids,
    is_seq2seq,
    load_generator,
    prompt_ids,
)
from ..retrieval import DOC_BATCH, DenseIndex, ShardedIndex, load_retriever
from .checkpoint import (
    data_fingerprints,
    full_optimizer_state,
    full_trainable_state,
    get_rng_state,
    load_full_state,
    read_checkpoint,
    set_rng_state,
    shard_optimizer_state,
    write_checkpoint,
)
from .config import TrainConfig, ivf_cells, resume_differences, validate
from .feedback import (
    encoder_passage_mask,
    leave_one_out_nll,
    passage_attention,
    passage_cross_attention,
    passage_token_mask,
)
from .files import RunLock, append_line, atomic_write, ensure_dir, read_bytes, remove_file

CHECKPOINT = "checkpoint.pt"
BEST_DIR = "best"
# What a training run writes into --output-dir (a fresh run refuses to replace them).
RUN_FILES = (CHECKPOINT, "metrics.json", "train_log.jsonl", "config.json", "curves.png", BEST_DIR)
_AMP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``: the LR factor at
    step s is ``s / warmup`` during the warm-up (0 at the first step), then 1 (constant) or a
    linear / half-cosine decay reaching 0 at ``total_steps``. A ``LambdaLR`` whose state
    (``last_epoch``, ``base_lrs``) goes into the checkpoint."""
    import transformers

    if schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup_steps)
    make = {
        "linear": transformers.get_linear_schedule_with_warmup,
        "cosine": transformers.get_cosine_schedule_with_warmup,
    }[schedule]
    return make(optimizer, warmup_steps, total_steps)


def _checkpoint_activations(model) -> None:
    """transformers' gradient checkpointing of ``model`` (``activation_checkpointing_enable``,
    or ``gradient_checkpointing_enable`` before transformers 5.x), non-reentrant."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _eager_attention(model) -> None:
    """Switch ``model`` to eager attention, the implementation that returns attention weights
    (``output_attentions=True``; SDPA / flash attention do not)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"


def _top_layers(model, seq2seq: bool):
    """``(layers, final norms)`` that ``--generator-train-layers`` trains the top of: a causal
    LM's transformer layers and final norm; an encoder-decoder model's decoder layers (BART
    ``decoder.layers``, T5 ``decoder.block``) and the decoder's final layer norm where it has
    one (mBART ``layer_norm``, T5 ``final_layer_norm``; BART has none). The encoder stays
    frozen then (no backward through it)."""
    if not seq2seq:
        return model.model.layers, [model.model.norm]
    dec = model.get_decoder()
    layers = getattr(dec, "layers", None)
    if layers is None:
        layers = getattr(dec, "block", None)
    if layers is None:
        raise UserError(
            f"--generator-train-layers: cannot find the decoder layers of {type(model).__name__}"
            " (pass --generator-train-layers -1 to train all parameters)"
        )
    norms = [
        m
        for name in ("layer_norm", "final_layer_norm")
        if isinstance(m := getattr(dec, name, None), torch.nn.Module)
    ]
    return layers, norms


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def local_device_index() -> int:
    """This process's GPU under torchrun (LOCAL_RANK), wrapped to the visible devices."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


_STARTED_GROUP = False  # setup_distributed started the process group (finish_distributed ends it)


def setup_distributed() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU)."""
    global _STARTED_GROUP
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and _dist() is None:
        import torch.distributed as dist

        if torch.cuda.is_available():  # every rank on its own GPU before NCCL starts
            torch.cuda.set_device(local_device_index())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _STARTED_GROUP = True
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def finish_distributed(ok: bool) -> None:
    """End the process group :func:`setup_distributed` started: after a barrier when the
    command succeeded (no rank tears it down while another is still in a collective), at once
    after an error. Left to process exit, gloo's threads could abort a rank ("terminate called
    without an active exception") after a successful run."""
    global _STARTED_GROUP
    d = _dist()
    if not _STARTED_GROUP or d is None:
        return
    _STARTED_GROUP = False
    try:
        if ok:
            d.barrier()
    finally:
        d.destroy_process_group()


def _load(flag: str, path: str, loader, **kw):
    """``loader(path)``; a missing/unreadable file or a malformed line is a UserError."""
    try:
        return loader(path, **kw)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{flag} {path}: is a directory, expected a JSONL file") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror or one_line(e)}") from e
    except ValueError as e:  # the loaders' "<path>, line <n>: <what is wrong>"
        raise UserError(one_line(e)) from e


def load_dataset(cfg: TrainConfig):
    """The corpus and question splits of ``cfg``; every input problem is a UserError naming
    the file (and line)."""
    from ..data import (
        Dataset,
        load_corpus_file,
        load_default,
        load_questions_file,
        training_answers_problem,
    )

    fmt = cfg.data_format
    if cfg.corpus is None:
        ds = load_default(seed=cfg.data_seed)
    else:
        corpus = _load("--corpus", cfg.corpus, load_corpus_file, data_format=fmt)
        if not corpus:
            raise UserError(f"{cfg.corpus}: the corpus is empty (no passages)")
        ds = Dataset(corpus=corpus, train=[], dev=[], test=[])
    ids = {p.id for p in ds.corpus}
    if cfg.train:
        ds.train = _load(
            "--train",
            cfg.train,
            load_questions_file,
            split="train",
            corpus=ds.corpus,
            corpus_ids=ids,
            data_format=fmt,
        )
        if not ds.train and cfg.steps > 0:
            raise UserError(f"{cfg.train}: no training questions (the file is empty)")
        if cfg.steps > 0 and (problem := training_answers_problem(cfg.train, ds.train)):
            raise UserError(problem)  # retrieval-only data (BEIR without answers)
    if cfg.dev:  # replaces the embedded dev split too (as --train / --eval replace theirs)
        try:
            ds.dev = _load(
                "--dev",
                cfg.dev,
                load_questions_file,
                split="dev",
                corpus=ds.corpus,
                corpus_ids=ids,
                data_format=fmt,
            )
        except UserError as e:  # "<path>, line <n>: ..." -> "--dev <path>, line <n>: ..."
            msg = str(e)
            if not msg.startswith("--dev"):
                msg = f"--dev {msg}" if msg.startswith(cfg.dev) else f"--dev {cfg.dev}: {msg}"
            raise UserError(msg) from e
        if not ds.dev:
            raise UserError(f"--dev {cfg.dev}: no dev questions (the file is empty)")
        if not cfg.eval_every:
            warn(f"--dev {cfg.dev}: only --eval-every evaluates on the dev split (not set)")
    if cfg.eval:
        ds.test = _load(
            "--eval",
            cfg.eval,
            load_questions_file,
            split="eval",
            corpus=ds.corpus,
            corpus_ids=ids,
            data_format=fmt,
        )
        if not ds.test:
            raise UserError(f"{cfg.eval}: no evaluation questions (the file is empty)")
    return ds


def passage_text(p) -> str:
    return f"{p.title}. {p.text}" if p.title else p.text


class CoTrainer:
    """The co-training run of ``cfg``. ``dataset`` (a :class:`~rag_kernels.cotrain.data.Dataset`)
    replaces the files / embedded set of ``cfg``; ``for_eval`` checks a ``--resume``
    checkpoint only for fitting the models (``rag-kernels eval``); ``run_lock`` is a held
    :class:`~.files.RunLock` on the output directory (``fit`` takes one otherwise).

    With ``cfg.resume`` and an existing checkpoint, the checkpoint is read, verified and
    compared with ``cfg`` here, before any model is loaded (a problem is a UserError)."""

    def __init__(
        self,
        cfg: TrainConfig,
        dataset=None,
        *,
        for_eval: bool = False,
        run_lock: RunLock | None = None,
    ):
        validate(cfg)
        self.cfg = cfg
        self.for_eval = for_eval
        self.run_lock = run_lock
        self.rank, self.world = setup_distributed()
        if cfg.fsdp and self.world == 1 and not for_eval:
            raise UserError(
                "--fsdp shards the models over the processes of a torchrun launch; one process "
                "has nothing to shard them over: launch with torchrun --nproc_per_node=N, or "
                "drop --fsdp"
            )
        self.sharded = bool(cfg.fsdp) and self.world > 1  # FSDP2 instead of replicas
        self.device = (
            torch.device("cuda", local_device_index())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self._seed_everything(cfg.seed)
        self.data = dataset if dataset is not None else load_dataset(cfg)
        if not self.data.corpus:
            raise UserError("the corpus is empty (no passages)")
        if not self.data.train and cfg.steps > 0 and not for_eval:
            raise UserError("no training questions: pass --train or use the embedded default")
        if (
            cfg.retriever_objective == "contrastive"
            and not for_eval
            and any(not ex.positive_ids for ex in self.data.train)
        ):
            raise UserError(
                "--retriever-objective contrastive needs positive_ids on every training question"
            )
        self._check_options_fit_data()
        self.fingerprints = data_fingerprints(self.data, self.world)
        ensure_dir(cfg.output_dir)
        self.checkpoint_path = os.path.join(cfg.output_dir, CHECKPOINT)
        self._resume_state = None
        if cfg.resume and os.path.lexists(self.checkpoint_path):
            self._resume_state = self._read_checkpoint(self.checkpoint_path)
        if not for_eval and self._resume_state is None and not cfg.overwrite:
            self._refuse_previous_run()
        self.texts = [passage_text(p) for p in self.data.corpus]
        self.pid_to_row = {p.id: i for i, p in enumerate(self.data.corpus)}
        corpus_texts = self.texts + [
            ex.question + " " + " ".join(ex.answers) for ex in self.data.train
        ]

        torch.manual_seed(cfg.seed)  # tiny-random models are built from this seed
        try:
            self.generator, self.tokenizer = load_generator(
                cfg.generator, corpus_texts=corpus_texts
            )
        except (OSError, ValueError, ImportError) as e:
            raise UserError(
                f"--generator {cfg.generator or '(default SmolLM2-135M-Instruct)'}: "
                f"cannot load the model: {one_line(e)[:300]}"
            ) from e
        self.generator.to(self.device)
        self.seq2seq = is_seq2seq(self.generator)  # encoder-decoder (BART, T5) or causal LM
        try:  # the head the losses use: weight, bias (BART), hidden scale (T5), softcap
            rk.hf.lm_head(self.generator)
        except ValueError as e:
            raise UserError(
                f"--generator {cfg.generator or '(default SmolLM2-135M-Instruct)'}: "
                f"{one_line(e)[:400]}"
            ) from e
        # learned positions (GPT-2's n_positions maps to it; T5's relative ones have no limit)
        n_pos = getattr(self.generator.config, "max_position_embeddings", None)
        if isinstance(n_pos, int) and cfg.max_new_tokens >= n_pos:  # decoding could never end
            raise UserError(
                f"--max-new-tokens {cfg.max_new_tokens}: the generator holds at most {n_pos} "
                "positions (prompt and answer together)"
            )
        if cfg.retriever_objective == "adist":  # attention weights: sdpa/flash do not return them
            if not getattr(self.tokenizer, "is_fast", False):
                raise UserError(
                    "--retriever-objective adist needs a fast (tokenizers) tokenizer to locate "
                    f"the passage tokens; --generator {cfg.generator}'s is "
                    f"{type(self.tokenizer).__name__}"
                )
            _eager_attention(self.generator)
        try:
            retriever = load_retriever(
                cfg.retriever,
                doc_encoder=cfg.doc_encoder,
                corpus_texts=corpus_texts,
                max_length=cfg.retriever_max_length,
            )
        except UserError:
            raise
        except (OSError, ValueError, ImportError) as e:
            raise UserError(
                f"--retriever {cfg.retriever or '(default all-MiniLM-L6-v2)'}: "
                f"cannot load the model: {one_line(e)[:300]}"
            ) from e
        self.retriever = retriever.to(self.device)
        if cfg.gradient_checkpointing:
            # non-reentrant: the checkpointed layers get gradients even when their inputs
            # (frozen embeddings / lower layers) need none; the RNG state is replayed
            for model in (self.generator, self.retriever.query_model):
                _checkpoint_activations(model)
        self._generator_pass = self._generator_terms
        if self.sharded:  # each decoder layer its own FSDP2 unit, then the root
            rk_fsdp.fully_shard_model(self.generator)
            if not cfg.freeze_retriever:
                rk_fsdp.fully_shard_model(self.retriever.query_model)
            self._generator_pass = rk_fsdp.forward_method(
                self.generator, lambda _gen, *a, **kw: self._generator_terms(*a, **kw),
                name="rk_cotrain_pass",
            )  # fmt: skip
        self._set_trainable()
        self.combine = CoTrainingLoss(
            generator_weight=cfg.generator_weight,
            retriever_weight=cfg.retriever_weight,
            balancing=cfg.balancing,
            retriever_freeze_steps=cfg.retriever_freeze_steps,
            retriever_warmup_steps=cfg.retriever_warmup_steps,
        ).to(self.device)
        groups = []
        if self.gen_params:
            groups.append({"params": self.gen_params, "lr": cfg.lr_generator, "name": "generator"})
        if self.ret_params:
            groups.append({"params": self.ret_params, "lr": cfg.lr_retriever, "name": "retriever"})
        extra = list(self.combine.parameters())
        if extra:
            groups.append({"params": extra, "lr": cfg.lr_retriever, "name": "balancing"})
        self.optimizer = torch.optim.AdamW(
            groups or [{"params": [torch.zeros(1, requires_grad=True)]}],
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = make_scheduler(
            self.optimizer, cfg.lr_schedule, cfg.warmup_steps, max(1, cfg.steps)
        )
        self.amp_dtype = _AMP_DTYPES[cfg.precision if cfg.precision != "auto" else (
            "bf16" if self.device.type == "cuda" else "fp32"
        )]  # fmt: skip
        # fp16 on CUDA: loss scaling (its scale is checkpointed); a no-op otherwise
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        nlist = ivf_cells(cfg)
        index_kw = dict(
            kind="ivf" if nlist else "flat",
            nlist=nlist or 64,
            nprobe=cfg.ivf_nprobe,
            use_gpu=self.device.type == "cuda",
            gpu_device=self.device.index or 0,
        )
        if cfg.index_shards == "world" and self.world > 1:  # 1/world of the corpus per rank
            self.index = ShardedIndex(len(self.texts), **index_kw, align=DOC_BATCH)
        else:
            self.index = DenseIndex(**index_kw)
        self.best: dict | None = None  # {"metric", "value", "step"} of output_dir/best/
        self.step = 0
        self.cursor = 0  # questions consumed (global, across ranks): the data position
        self.log_path = os.path.join(cfg.output_dir, "train_log.jsonl")
        self._stop_requested = False  # set by the first Ctrl-C: stop at the step boundary
        self._updating = False  # inside the optimizer update (a state not to checkpoint)
        self._consistent = True

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        from transformers import set_seed  # python, numpy, torch (CPU and every CUDA device)

        set_seed(seed)

    def _check_options_fit_data(self) -> None:
        """Options that the data must allow (before any model is loaded)."""
        cfg = self.cfg
        n = len(self.data.corpus)
        if cfg.docs > n and self.rank == 0:
            warn(f"--docs {cfg.docs}: the corpus has {n} passages; every question reads all {n}")
        if self.for_eval:
            return
        if (
            cfg.retriever_objective == "loop"
            and not cfg.freeze_retriever
            and min(cfg.docs, len(self.data.corpus)) < 2
        ):
            raise UserError(
                "--retriever-objective loop needs 2 or more documents per question; the "
                "corpus has 1 passage"
            )

    def _check_dev_split(self) -> None:
        """``--eval-every`` needs dev questions (checked when training starts, so that a
        checkpoint can be resumed with ``--eval-every`` changed and ``--resume-force``)."""
        cfg = self.cfg
        if cfg.eval_every:
            if not self.data.dev:
                raise UserError(
                    f"--eval-every {cfg.eval_every}: the data has no dev split to evaluate on "
                    "(pass one with --dev FILE; only the embedded set has its own)"
                )
            if cfg.best_metric.startswith(("recall@", "mrr@")):
                if not any(ex.positive_ids for ex in self.data.dev):
                    raise UserError(
                        f"--best-metric {cfg.best_metric}: no dev question has positive_ids "
                        "(choose an answer metric: f1, em, ...)"
                    )
            elif not any(ex.answers for ex in self.data.dev):
                raise UserError(
                    f"--best-metric {cfg.best_metric}: no dev question has answers "
                    "(retrieval-only dev data: choose recall@1, recall@5, recall@20 or mrr@10)"
                )

    def _set_trainable(self) -> None:
        cfg = self.cfg
        g = self.generator
        g.requires_grad_(False)
        if not cfg.freeze_generator:
            if cfg.generator_train_layers < 0:
                g.requires_grad_(True)
            else:
                layers, norms = _top_layers(g, self.seq2seq)
                for layer in layers[len(layers) - cfg.generator_train_layers :]:
                    layer.requires_grad_(True)
                for norm in norms:
                    norm.requires_grad_(True)
        self.gen_params = [p for p in g.parameters() if p.requires_grad]
        q = self.retriever.query_model
        q.requires_grad_(not cfg.freeze_retriever)
        self.ret_params = [p for p in q.parameters() if p.requires_grad]

    def refresh_index(self) -> None:
        """(Re-)embed the corpus and rebuild the index; a sharded index (torchrun with
        ``--index-shards world``) embeds this rank's rows only, so every rank refreshes at
        the same step (no collective here; the searches are)."""
        restored = self.index.built_at  # set by a checkpoint whose index was not stored
        if (
            self.index.embeddings is None
            and restored is not None
            and restored != self.step
            and self.rank == 0
        ):
            warn(
                f"the checkpoint holds no copy of the sharded index (built at step {restored}): "
                f"re-embedded with the weights of step {self.step}; until the next refresh, "
                "retrieval differs from the checkpointed run's"
            )
        model = self.retriever.query_model
        training = model.training
        self.retriever.eval()
        progress = self.cfg.progress and self.rank == 0
        with torch.no_grad():
            self.index.refresh(
                self.texts,
                lambda texts: self.retriever.encode_docs(texts, progress=progress),
                dim=self.retriever.dim,
            )
        model.train(training)
        self.index.built_at = self.step

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, questions: list[str], k: int, *, grad: bool):
        """Top-k documents: ``(rows [B,k], scores [B,k])``; scores differentiable if ``grad``."""
        cfg = self.cfg
        if self.index.embeddings is None:  # loaded from a checkpoint without the (sharded) index
            self.refresh_index()
        with torch.set_grad_enabled(grad):
            q = self.retriever.encode_queries(questions)
        if not bool(torch.isfinite(q.detach()).all()):  # the index would refuse them
            what = "the query embeddings are non-finite"
            if grad:
                raise UserError(self._diverged(what, self.step + 1))  # in the step under way
            raise UserError(f"{what}: the retriever's weights are not usable (NaN / inf)")
        n_cand = min(len(self.texts), k * max(1, cfg.rerank))
        reencode = self.retriever.doc_mode == "shared" and grad
        if reencode:
            _, cand = self.index.search(q, n_cand)
        else:  # the candidates' embeddings come with them (from their shards when sharded)
            _, cand, d = self.index.search_with_embeddings(q, n_cand)
        if bool((cand < 0).any()):
            raise UserError(
                f"the IVF index found fewer than {n_cand} passages in the cells it searched "
                f"for a question: raise --ivf-nprobe (now {cfg.ivf_nprobe or 'min(8, cells)'})"
            )
        cand = cand.to(self.device)
        if reencode:
            flat = [self.texts[i] for i in cand.reshape(-1).tolist()]
            d = self.retriever.encode_docs(flat, grad=True).view(*cand.shape, -1)
        else:
            d = d.to(self.device)
        scores = cfg.score_scale * (q[:, None, :] * d).sum(-1)
        if n_cand > k:  # re-rank the candidates with the current encoders
            top = scores.detach().topk(k, dim=-1).indices
            cand, scores = cand.gather(1, top), scores.gather(1, top)
        return cand, scores, q

    # ------------------------------------------------------------------ training
    def _batch(self) -> list:
        """This rank's questions of the next global batch (deterministic in seed and cursor)."""
        n, b = len(self.data.train), self.cfg.batch_size
        out = []
        for j in range(self.rank * b, (self.rank + 1) * b):
            pos = self.cursor + j
            epoch, off = divmod(pos, n)
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
            )
            out.append(self.data.train[int(perm[off])])
        self.cursor += b * self.world
        return out

    def micro_step(self, examples: list) -> dict:
        cfg = self.cfg
        K = min(cfg.docs, len(self.texts))
        retr_active = not cfg.freeze_retriever and self.combine.retriever_active(self.step)
        rows, scores, q = self.retrieve(
            [ex.question for ex in examples], K, grad=not cfg.freeze_retriever
        )
        docs = [[self.texts[i] for i in r] for r in rows.tolist()]
        want_attention = cfg.retriever_objective == "adist" and retr_active
        dev = self.device
        rag_scores = (
            scores if (retr_active and cfg.retriever_objective == "rag") else scores.detach()
        )
        want_feedback = not cfg.freeze_retriever and cfg.retriever_objective in (
            "loop", "emdr2", "pdist", "lsr"
        )  # fmt: skip
        # --precision: autocast of the generator and the fused LM head (rk ops follow autocast)
        amp = self.amp_dtype
        with torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32):
            target, attention, gen_loss, fb = self._generator_pass(
                [ex.question for ex in examples],
                docs,
                [ex.answers[0] for ex in examples],
                rag_scores,
                attention=want_attention,
                feedback=want_feedback,
            )
            ret_loss = None
            if not cfg.freeze_retriever and cfg.retriever_objective != "rag":
                ret_loss = self._retriever_objective(target, scores, q, examples, attention, fb)
        res = self.combine(
            gen_loss,
            ret_loss,
            step=self.step,
            grad_wrt=[scores] if cfg.balancing == "gradnorm" else None,
        )
        # No term carries a gradient (e.g. --freeze-generator while the retriever's freeze
        # lasts): the step updates nothing, and the schedules and counters still advance.
        if res.loss.requires_grad:
            self.scaler.scale(res.loss / cfg.grad_accum).backward()  # fp16 + CUDA: scaling
        logs = res.as_dict()
        gold = [set(self.pid_to_row.get(p, -1) for p in ex.positive_ids) for ex in examples]
        if any(gold):  # on this batch: gold passage ranked first / anywhere in the top K
            r = rows.tolist()
            logs["retrieval_top1"] = float(
                np.mean([x[0] in g for g, x in zip(gold, r, strict=False)])
            )
            logs["retrieval_hit"] = float(
                np.mean([bool(g & set(x)) for g, x in zip(gold, r, strict=False)])
            )
        return logs

    def _generator_terms(self, questions, documents, answers, rag_scores, *, attention, feedback):
        """The generator's part of a micro-step: ``(target [B, T], passage attention or None,
        the RAG loss, rk.generator_feedback on the detached hidden states or None)``. Under
        ``--fsdp`` it runs as an FSDP forward method of the generator (``_generator_pass``):
        the root unit (embeddings, LM head) is gathered for the call, the head read here whole."""
        head = rk.hf.lm_head(self.generator)  # weight, bias (BART), softcap (Gemma 2)
        hidden, target, att = self.generator_hidden(
            questions, documents, answers, attention=attention
        )
        loss = rk.rag_loss(
            hidden, head.weight, target, rag_scores, mode=self.cfg.mode,
            label_smoothing=self.cfg.label_smoothing, bias=head.bias, softcap=head.softcap,
        )  # fmt: skip
        fb = None
        if feedback:  # the retriever objectives' generator signal (no gradient)
            fb = rk.generator_feedback(
                hidden.detach(), head.weight, target, bias=head.bias, softcap=head.softcap
            )
        return target, att, loss, fb

    def generator_hidden(self, questions, documents, answers, *, attention: bool = False):
        """The generator on the (document, question) prompts of ``questions`` [B] and
        ``documents`` [B][K] with ``answers`` [B] as the target: ``(hidden [B, K, T, H],
        target [B, T], passage attention [B, K] or None)``, for ``rk.rag_loss`` with the head
        of ``rk.hf.lm_head`` (``hidden`` carries its ``hidden_scale``).

        A causal LM reads the left-padded prompt + answer rows (``hidden[:, :-1]``: position t
        predicts token t+1). An encoder-decoder model encodes the prompt and decodes the
        answer + EOS, shifted right by the model's own rule (``rk.hf.seq2seq_rag_hidden``: the
        decoder's last hidden states, one target shared by the K documents). ``attention``:
        adist's attention mass of the answer on each passage (the self-attention of a causal
        LM, the decoder's cross-attention over the encoder positions of a seq2seq model)."""
        cfg, dev = self.cfg, self.device
        opts = dict(
            max_doc_tokens=cfg.max_doc_tokens,
            prompt=cfg.prompt_template,
            max_answer_tokens=cfg.max_answer_tokens or None,
        )
        if self.seq2seq:
            batch = build_seq2seq_generator_batch(
                self.tokenizer, questions, documents, answers, **opts
            )
            target = batch.target.to(dev)
            if not attention:
                return rk.hf.seq2seq_rag_hidden(self.generator, batch), target, None
            hidden, cross = rk.hf.seq2seq_rag_hidden(
                self.generator, batch, return_cross_attentions=True
            )
            mask = encoder_passage_mask(
                self.tokenizer, batch, questions, documents, cfg.prompt_template,
                cfg.max_doc_tokens,
            ).to(dev)  # fmt: skip
            return hidden, target, passage_cross_attention(cross, mask, target, batch.n_docs)
        batch = build_generator_batch(self.tokenizer, questions, documents, answers, **opts)
        target = batch.target.to(dev)
        out = self.generator.model(
            input_ids=batch.input_ids.to(dev),
            attention_mask=batch.attention_mask.to(dev),
            position_ids=batch.position_ids.to(dev),
            **({"output_attentions": True} if attention else {}),
        )
        hidden = out.last_hidden_state[:, :-1]
        B, K = len(questions), batch.n_docs
        hidden = hidden.reshape(B, K, hidden.shape[1], hidden.shape[2])
        if not attention:
            return hidden, target, None
        mask = passage_token_mask(
            self.tokenizer, batch, questions, documents, cfg.prompt_template, cfg.max_doc_tokens
        ).to(dev)
        return hidden, target, passage_attention(out.attentions, mask, target, K)

    def _retriever_objective(self, target, scores, q, examples, attention=None, fb=None):
        """The retriever objective; ``fb``: rk.generator_feedback of the micro-step (loop,
        emdr2, pdist, lsr), ``attention``: the passage attention (adist)."""
        cfg = self.cfg
        m = target != -100
        tau_s, tau_g = cfg.retriever_temperature, cfg.generator_temperature
        if cfg.retriever_objective == "adist":  # attention [B, K] (passage_attention)
            if attention is None:  # the retriever objective is still frozen (weight 0)
                attention = torch.zeros_like(scores.detach())
            return R.adist_loss(
                scores, attention, retriever_temperature=tau_s, generator_temperature=tau_g
            )
        if cfg.retriever_objective == "loop":
            nll = leave_one_out_nll(scores, fb, m, cfg.mode)
            return R.loop_loss(
                scores, nll, retriever_temperature=tau_s, generator_temperature=tau_g
            )
        if cfg.retriever_objective == "emdr2":
            return R.emdr2_loss(
                scores, fb.token_logprobs, token_mask=m, level="token", retriever_temperature=tau_s
            )
        if cfg.retriever_objective == "pdist":
            return R.pdist_loss(
                scores, fb.mean_logprob, retriever_temperature=tau_s, generator_temperature=tau_g
            )
        if cfg.retriever_objective == "lsr":
            return R.lsr_loss(
                scores, fb.sum_logprob, retriever_temperature=tau_s, lm_temperature=tau_g
            )
        # contrastive: in-batch negatives over the gold passages' (frozen-index) embeddings
        pos_rows = torch.tensor(
            [self.pid_to_row[ex.positive_ids[0]] for ex in examples], device=self.device
        )
        d = self.index.rows(pos_rows).to(self.device)  # collective when sharded
        ids = pos_rows
        return rk.contrastive_loss(q, d, None, scale=cfg.score_scale, similarity="dot", doc_ids=ids)

    def optimizer_step(self) -> dict:
        cfg = self.cfg
        d = _dist()
        params = self.gen_params + self.ret_params + list(self.combine.parameters())
        if d is not None:  # data parallel: average the gradients over ranks (what DDP does)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if not rk_fsdp.is_dtensor(p.grad):  # FSDP2 reduce-scattered (averaged) its own
                    d.all_reduce(p.grad)
                    p.grad /= self.world
        norms = {}
        scaled = self.scaler.is_enabled()
        if scaled:  # fp16: clip the true gradients; unscale_ marks the optimizer (no rollback)
            self._updating = True
            self.scaler.unscale_(self.optimizer)
        for name, ps in (("generator", self.gen_params), ("retriever", self.ret_params)):
            if ps:
                clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(ps, clip)  # DTensor-aware (FSDP2)
                if rk_fsdp.is_dtensor(norm):
                    norm = norm.full_tensor()
                norms[f"grad_norm_{name}"] = float(norm)
        self._updating = True  # from here on the step cannot be rolled back
        scale = self.scaler.get_scale() if scaled else None
        self.scaler.step(self.optimizer)  # optimizer.step(), skipped on inf/NaN gradients (fp16)
        self.scaler.update()
        if not scaled or self.scaler.get_scale() >= scale:
            self.scheduler.step()  # as transformers' Trainer: not after a skipped step
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if (
            cfg.refresh_every
            and self.retriever.doc_mode == "shared"
            and self.step % cfg.refresh_every == 0
        ):
            self.refresh_index()
        self._updating = False
        return norms

    def train_step(self) -> dict:
        self.generator.train()
        self.retriever.query_model.train(not self.cfg.freeze_retriever)
        t0 = time.perf_counter()
        acc: dict[str, list[float]] = {}
        for _ in range(self.cfg.grad_accum):
            for key, val in self.micro_step(self._batch()).items():
                acc.setdefault(key, []).append(val)
        logs = self._mean_over_ranks({k: float(np.mean(v)) for k, v in acc.items()})
        lrs = {"lr_generator": self._lr("generator"), "lr_retriever": self._lr("retriever")}
        logs.update(self.optimizer_step())
        self._check_finite_weights(logs)
        dt = time.perf_counter() - t0
        logs.update(
            step=self.step,
            seconds=dt,
            questions_per_s=self.cfg.batch_size * self.cfg.grad_accum * self.world / dt,
            **lrs,  # the learning rates this step's update used
        )
        return logs

    def _mean_over_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        """The step's logged values (losses, weights, retrieval hits) averaged over the
        data-parallel ranks: the loss of the whole global batch, as the averaged gradients
        are, not rank 0's part of it. A value that only some ranks have (retrieval hits need
        a gold passage in the rank's batch) is averaged over those. One small all-gather."""
        d = _dist()
        if d is None or self.world == 1:
            return logs
        parts: list = [None] * self.world
        d.all_gather_object(parts, logs)
        keys = sorted({k for p in parts for k in p})
        return {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}

    def _check_finite_weights(self, logs: dict) -> None:
        """After an update: non-finite weights (a diverged run, e.g. a learning rate far too
        high) stop the run here, before a checkpoint or an evaluation holds them."""
        bad = torch.zeros((), device=self.device)
        for p in self.gen_params + self.ret_params + list(self.combine.parameters()):
            t = p.to_local() if rk_fsdp.is_dtensor(p) else p
            bad += (~torch.isfinite(t.detach())).any()
        d = _dist()
        if d is not None:  # every rank stops, whichever holds the non-finite shard
            d.all_reduce(bad)
        if bad.item():
            loss = logs.get("loss", float("nan"))
            raise UserError(
                self._diverged(
                    f"the weights are non-finite after the update (loss {loss:.4g})", self.step
                )
            )

    def _diverged(self, what: str, step: int) -> str:
        return (
            f"step {step}: training diverged: {what}; lower --lr-generator / "
            "--lr-retriever (or --generator-weight / --retriever-weight, if raised) (no "
            "checkpoint written since the last one)"
        )

    def _lr(self, name: str) -> float | None:
        return next((g["lr"] for g in self.optimizer.param_groups if g.get("name") == name), None)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, examples: list, *, desc: str = "eval") -> dict:
        """Retrieval and answer metrics on ``examples`` (every rank evaluates them all).
        Under ``--fsdp`` the generator's root unit is gathered for the whole evaluation
        (decoding calls its submodules directly), its blocks around their forwards."""
        with rk_fsdp.unsharded(self.generator):
            return self._evaluate(examples, desc=desc)

    def _evaluate(self, examples: list, *, desc: str) -> dict:
        from ..eval import evaluate_all

        cfg = self.cfg
        if cfg.eval_limit:
            examples = examples[: cfg.eval_limit]
        self.generator.eval()
        self.retriever.eval()
        ranked, retrieved_texts, predictions, retrieved = [], [], [], []
        K = min(cfg.docs, len(self.texts))
        k_eval = min(max(20, K), len(self.texts))
        bs = cfg.eval_batch_size
        chunks = range(0, len(examples), bs)
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=desc, unit="batch", leave=False)
        for i in chunks:
            part = examples[i : i + bs]
            rows, scores, _ = self.retrieve([ex.question for ex in part], k_eval, grad=False)
            for r, s in zip(rows.tolist(), scores.tolist(), strict=True):  # best first
                ranked.append([self.data.corpus[j].id for j in r])
                retrieved_texts.append([self.texts[j] for j in r[:K]])
                retrieved.append(
                    [(self.data.corpus[j].id, x) for j, x in zip(r[:K], s[:K], strict=True)]
                )
            if any(ex.answers for ex in part):
                predictions += self._answers(
                    [ex.question for ex in part], rows[:, :K], scores[:, :K]
                )
            else:  # retrieval-only questions (BEIR without answers): nothing to decode
                predictions += [""] * len(part)
        self.last_predictions = [
            prediction_record(ex, p, r)
            for ex, p, r in zip(examples, predictions, retrieved, strict=True)
        ]
        keep = [i for i, ex in enumerate(examples) if ex.answers]  # answer metrics need answers
        return evaluate_all(
            ranked_ids=ranked,
            positive_ids=[ex.positive_ids for ex in examples],
            predictions=[predictions[i] for i in keep] if keep else None,
            answers=[examples[i].answers for i in keep] if keep else None,
            retrieved_texts=[retrieved_texts[i] for i in keep] if keep else None,
        ) | {"n": len(examples)}

    def _prompt_ids(self, question: str, document: str) -> list[int]:
        """The generator prompt of one (question, document) pair at evaluation (the encoder
        input of an encoder-decoder generator)."""
        return (encoder_prompt_ids if self.seq2seq else prompt_ids)(
            self.tokenizer,
            question,
            document,
            max_doc_tokens=self.cfg.max_doc_tokens,
            prompt=self.cfg.prompt_template,
        )

    def _answers(self, questions: list[str], rows: torch.Tensor, scores: torch.Tensor) -> list[str]:
        """Answers decoded from the K retrieved documents ``rows [B, K]`` (best first) with
        retriever ``scores [B, K]``: ``--eval-decoding marginal`` marginalises over the K
        documents as the RAG loss of ``--mode`` does (see eval/decoding.py), ``top1`` is
        greedy decoding from the top-1 document (:meth:`generate`)."""
        if self.cfg.eval_decoding == "top1":
            return self.generate(questions, [self.texts[r[0]] for r in rows.tolist()])
        from ..eval.decoding import marginal_answers

        prompts = [
            [self._prompt_ids(q, self.texts[j]) for j in r]
            for q, r in zip(questions, rows.tolist(), strict=True)
        ]
        return marginal_answers(
            self.generator,
            self.tokenizer,
            prompts,
            scores,
            mode=self.cfg.mode,
            max_new_tokens=self.cfg.max_new_tokens,
        )

    def generate(self, questions: list[str], documents: list[str]) -> list[str]:
        """Greedy answers from one document per question: ``generate`` of a causal LM; for an
        encoder-decoder model the greedy decoding of eval/decoding.py with K = 1 (step-wise
        decoder calls on the encoded prompt; the checkpoint's generation_config, e.g. beam
        search or a minimum length, is not applied)."""
        tok = self.tokenizer
        prompts = [self._prompt_ids(q, d) for q, d in zip(questions, documents, strict=False)]
        if self.seq2seq:
            from ..eval.decoding import marginal_answers

            return marginal_answers(
                self.generator,
                tok,
                [[p] for p in prompts],
                torch.zeros(len(prompts), 1),
                mode="token",
                max_new_tokens=self.cfg.max_new_tokens,
            )
        L = max(len(p) for p in prompts)
        pad = tok.pad_token_id  # load_generator sets one (EOS) when the tokenizer has none
        enc = tok.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        out = self.generator.generate(
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, L:], skip_special_tokens=True)
        return [t.strip().split("\n")[0].strip() for t in texts]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The training state as tensors and plain data (``torch.load(weights_only=True)``).
        Under ``--fsdp`` the same full tensors, gathered to rank 0: a collective (every rank
        calls it; the other ranks' dicts lack the gathered weights)."""

        # Frozen weights are reloaded from their source; only what trains is saved.
        def trainable(m):
            if rk_fsdp.is_sharded(m):
                return full_trainable_state(m)
            return {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}

        return {
            "step": self.step,
            "cursor": self.cursor,
            "config": self.cfg.to_dict(),
            "data": dict(self.fingerprints),
            "generator": trainable(self.generator),
            "retriever": trainable(self.retriever.query_model),
            "optimizer": (
                full_optimizer_state(self.optimizer)
                if self.sharded
                else self.optimizer.state_dict()
            ),
            "scheduler": self.scheduler.state_dict(),
            "combine": self.combine.state_dict(),
            "index": self.index.state_dict() if self.retriever.doc_mode == "shared" else None,
            "rng": get_rng_state(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16 on CUDA
            "best": dict(self.best) if self.best else None,  # what best/ holds (--eval-every)
        }

    def save_checkpoint(self) -> str:
        """Write ``<output-dir>/checkpoint.pt`` (rank 0; atomic, checksummed; see checkpoint.py).
        Call it at a step boundary: it records ``step`` and the data ``cursor`` together.
        Under ``--fsdp`` every rank must call it (the weights are gathered)."""
        if self.rank != 0 and not self.sharded:
            return ""
        state = self.state_dict()
        if self.rank != 0:
            return ""
        path = os.path.join(self.cfg.output_dir, CHECKPOINT)
        write_checkpoint(path, state)
        return path

    def _read_checkpoint(self, path: str) -> dict:
        """Read and verify a checkpoint and check it against this run's configuration."""
        st = read_checkpoint(path, map_location=self.device)
        if not isinstance(st["config"], dict) or not isinstance(st["data"], dict):
            raise UserError(f"{path}: corrupt checkpoint (no recorded configuration)")
        cfg = self.cfg
        if not self.for_eval and st["step"] > cfg.steps:
            raise UserError(
                f"--steps {cfg.steps}: {path} is at step {st['step']} already; pass --steps "
                f">= {st['step']} to continue it (or another --output-dir)"
            )
        unsafe, safe = resume_differences(
            st["config"], cfg.to_dict(), st["data"], self.fingerprints, for_eval=self.for_eval
        )
        what = "evaluate" if self.for_eval else "resume"
        if unsafe:
            extra = ""
            if safe:
                extra = f"; also changed (safe with --resume-force): {', '.join(safe)}"
            raise UserError(
                f"{path}: cannot {what} with a different configuration: {', '.join(unsafe)}{extra}"
                f" (these are refused even with --resume-force: use the checkpoint's options, "
                f"or a new --output-dir)"
            )
        if safe and not cfg.resume_force:
            raise UserError(
                f"{path}: options differ from the checkpoint's: {', '.join(safe)}; "
                "they are safe to change: add --resume-force to accept them"
            )
        if safe:
            warn(f"resuming {path} with changed options (--resume-force): {', '.join(safe)}")
        return st

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore the state of the checkpoint at ``path`` (default: the one read at
        construction with ``cfg.resume``, else ``<output-dir>/checkpoint.pt``)."""
        st = self._resume_state if path is None or path == self.checkpoint_path else None
        path = path or self.checkpoint_path
        if st is None:
            st = self._read_checkpoint(path)
        self._resume_state = None
        self._apply_state(st, path)
        set_rng_state(st["rng"])

    def _apply_state(self, st: dict, path: str) -> None:
        """Weights, optimizer, scheduler, balancing, index, step and cursor (not the RNG)."""
        try:
            for name, module in (
                ("generator", self.generator),
                ("retriever", self.retriever.query_model),
            ):
                if rk_fsdp.is_sharded(module):  # every rank keeps its shard of the full tensors
                    res = load_full_state(module, st[name])
                else:
                    res = module.load_state_dict(st[name], strict=False)
                trainable = {k for k, p in module.named_parameters() if p.requires_grad}
                missing = sorted(trainable & set(res.missing_keys))
                if res.unexpected_keys or missing:
                    bad = (res.unexpected_keys or missing)[:3]
                    raise UserError(
                        f"{path}: does not fit the {name} (parameters {bad} "
                        f"{'unknown' if res.unexpected_keys else 'missing'})"
                    )
            opt = st["optimizer"]
            self.optimizer.load_state_dict(
                shard_optimizer_state(self.optimizer, opt) if self.sharded else opt
            )
            self.scheduler.load_state_dict(st["scheduler"])
            self.combine.load_state_dict(st["combine"])
            if st["index"] is not None:
                self.index.load_state_dict(st["index"])
            if st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            self.best = dict(st["best"]) if st.get("best") else None
        except UserError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: does not fit the models: {one_line(e)[:300]}") from e
        self.step, self.cursor = int(st["step"]), int(st["cursor"])

    # ------------------------------------------------------------------ interruption
    def _on_sigint(self, signum=None, frame=None) -> None:
        """SIGINT handler during training: the first Ctrl-C stops at the end of the current
        step (checkpoint, exit 130); a second one interrupts at once."""
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print(
            "\nCtrl-C: stopping after this step (press again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def request_stop(self) -> None:
        """Stop at the end of the current step, as on Ctrl-C (without the message)."""
        self._stop_requested = True

    def _should_stop(self) -> bool:
        stop = self._stop_requested
        d = _dist()
        if d is not None:  # every rank stops at the same step
            t = torch.tensor([int(stop)], device=self.device)
            d.all_reduce(t, op=d.ReduceOp.MAX)
            stop = bool(t.item())
        return stop

    def _snapshot(self) -> dict:
        """What a step changes before its optimizer update (to undo an interrupted step)."""
        return {
            "step": self.step,
            "cursor": self.cursor,
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "combine": {k: v.detach().clone() for k, v in self.combine.state_dict().items()},
        }

    def _rollback(self, snap: dict) -> None:
        """Undo a step interrupted before its optimizer update: cursor, RNG, balancing state
        and gradients back to the step boundary. Interrupted during the update, the state is
        inconsistent and ``_consistent`` turns False (no checkpoint may be written)."""
        if self._updating:
            self._consistent = False
            return
        if self.step != snap["step"]:
            return  # the update completed: a consistent state at the next step
        self.cursor = snap["cursor"]
        random.setstate(snap["python"])
        np.random.set_state(snap["numpy"])
        torch.set_rng_state(snap["torch"])
        if snap["cuda"] is not None:
            torch.cuda.set_rng_state_all(snap["cuda"])
        self.combine.load_state_dict(snap["combine"])
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the log
    def _log(self, logs: dict) -> None:
        append_line(self.log_path, json.dumps(logs))

    def _truncate_log(self, upto_step: int) -> None:
        """Keep one line per step <= ``upto_step`` (the checkpoint's): a run killed after its
        last checkpoint logged steps the resumed run will log again; a line torn by the
        crash is dropped with a warning."""
        if not os.path.lexists(self.log_path):
            return
        rows: dict[int, str] = {}
        text = read_bytes(self.log_path).decode("utf-8", "replace")
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            row = _parse_log_line(line)
            if row is None:
                warn(f"{self.log_path}, line {i}: unparsable (torn by a crash?): dropped")
                continue
            if row["step"] <= upto_step:
                rows[row["step"]] = line
        kept = "".join(rows[k] + "\n" for k in sorted(rows))
        atomic_write(self.log_path, lambda fh: fh.write(kept.encode("utf-8")))

    # ------------------------------------------------------------------ the whole run
    def fit(self) -> dict:
        """Train to ``cfg.steps`` (resuming if asked), evaluate, write the outputs. The output
        directory is locked for the duration (rank 0). Ctrl-C: checkpoint at the end of the
        current step, then ``SystemExit(130)``."""
        lock = None
        if self.rank == 0 and (self.run_lock is None or not self.run_lock.held):
            lock = RunLock(self.cfg.output_dir).acquire()
        ok = False
        try:
            metrics = self._fit()
            ok = True
            return metrics
        finally:
            if lock is not None:
                lock.release(discard_unused=not ok)

    def _refuse_previous_run(self) -> None:
        """A run without a checkpoint to resume would replace a previous run's files."""
        out = self.cfg.output_dir
        found = [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))]
        if found:
            cont = "continue it with --resume, " if CHECKPOINT in found else ""
            raise UserError(
                f"--output-dir {out} holds a previous run ({', '.join(found)}): {cont}replace "
                "it with --overwrite, or pass another --output-dir"
            )

    def _start_fresh(self) -> None:
        """A fresh run (none to resume; a previous one only with --overwrite): the previous
        run's files go now, not when this run ends, and this run's config.json is written at
        once. Left in place, an interrupted new run sat next to the old config.json (which
        ``eval`` then read for the new checkpoint), metrics.json (which ``--resume`` took as
        this run's) and best/."""
        import shutil

        out = self.cfg.output_dir
        for name in RUN_FILES:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                remove_file(path)  # a symlink itself, never its target
        self._write_json(os.path.join(out, "config.json"), self.cfg.to_dict())

    def _fit(self) -> dict:
        cfg = self.cfg
        self._check_dev_split()
        metrics_path = os.path.join(cfg.output_dir, "metrics.json")
        metrics = {}
        st = self._resume_state
        self._resume_state = None
        if st is None and cfg.resume and os.path.lexists(self.checkpoint_path):
            st = self._read_checkpoint(self.checkpoint_path)  # appeared since construction
        resumed = st is not None
        if resumed and os.path.lexists(metrics_path):
            metrics = read_metrics(metrics_path)
        if resumed:
            self._apply_state(st, self.checkpoint_path)
        if self.index.embeddings is None:
            self.refresh_index()
        if self.rank == 0:
            if resumed:
                self._truncate_log(self.step)
            else:
                self._start_fresh()
        if not cfg.skip_initial_eval and "initial" not in metrics:
            metrics["initial"] = self.evaluate(self.data.test, desc="initial eval")
            self._report("initial", metrics["initial"])
            self._write_json(metrics_path, metrics)
        if resumed:  # last, so that nothing between the checkpoint and the next step draws
            set_rng_state(st["rng"])
        interrupted = False
        self._stop_requested, self._consistent = False, True
        try:
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C raises KeyboardInterrupt as usual
            previous = None
        bar = None
        try:
            steps = range(self.step, cfg.steps)
            if cfg.progress and self.rank == 0:
                from tqdm.auto import tqdm

                bar = tqdm(
                    steps, desc="co-training", initial=self.step, total=cfg.steps, unit="step"
                )
                steps = bar
            for _ in steps:
                snap = self._snapshot()
                try:
                    logs = self.train_step()
                except KeyboardInterrupt:
                    self._rollback(snap)
                    raise
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    try:
                        logs.update(self.evaluate_dev())
                    except KeyboardInterrupt:  # a second Ctrl-C: the step itself is complete
                        if self.rank == 0:
                            self._log(logs)
                        raise
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    self._log(logs)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{logs['loss']:.3f}",
                        top1=f"{logs.get('retrieval_top1', float('nan')):.2f}",
                        qps=f"{logs['questions_per_s']:.2f}",
                    )
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._should_stop():
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        if interrupted:
            if self._consistent:
                path = self.save_checkpoint()
                if self.rank == 0:
                    print(
                        f"\ninterrupted at step {self.step}: checkpoint written to {path}; "
                        f"continue with --resume --output-dir {cfg.output_dir}",
                        flush=True,
                    )
            elif self.rank == 0:
                print(
                    f"\ninterrupted inside the optimizer update of step {self.step + 1}: no "
                    f"checkpoint written (the last one, if any, is kept)",
                    flush=True,
                )
            raise SystemExit(130)
        self.save_checkpoint()
        metrics["final"] = self.evaluate(self.data.test, desc="final eval")
        self._report("final", metrics["final"])
        if self.best:
            metrics["best"] = dict(self.best)  # the dev selection of best/ (--eval-every)
        if self.rank == 0:
            self._write_json(metrics_path, metrics)
            self._write_json(os.path.join(cfg.output_dir, "config.json"), cfg.to_dict())
            plot_curves(self.log_path, os.path.join(cfg.output_dir, "curves.png"))
        return metrics

    def evaluate_dev(self) -> dict:
        """``--eval-every``: evaluate on the dev split; when ``--best-metric`` beats the best so
        far, replace ``<output-dir>/best/`` (checkpoint.pt, metrics.json, config.json) as a
        whole, atomically. Returns the metrics as ``dev_<name>`` log entries."""
        cfg = self.cfg
        m = self.evaluate(self.data.dev, desc=f"dev eval (step {self.step})")
        self._report(f"dev {self.step}", m)
        if self.best is not None and self.best.get("metric") != cfg.best_metric:
            self.best = None  # --best-metric changed on resume (--resume-force): start over
        value = m.get(cfg.best_metric)
        if value is None:
            warn(f"--best-metric {cfg.best_metric}: not available on the dev split; best/ kept")
        elif self.best is None or value > self.best["value"]:
            self.best = {"metric": cfg.best_metric, "value": float(value), "step": self.step}
            if self.rank == 0 or self.sharded:  # --fsdp: every rank gathers the weights
                self._write_best(m)
        return {f"dev_{k}": v for k, v in m.items() if v is not None}

    def _write_best(self, dev_metrics: dict) -> None:
        from .bestdir import replace_dir

        state = self.state_dict()
        if self.rank != 0:
            return
        meta = json.dumps(dict(self.best, dev=dev_metrics), indent=2).encode("utf-8")
        conf = json.dumps(self.cfg.to_dict(), indent=2).encode("utf-8")

        def fill(tmp: str) -> None:
            write_checkpoint(os.path.join(tmp, CHECKPOINT), state)
            atomic_write(os.path.join(tmp, "metrics.json"), lambda fh: fh.write(meta))
            atomic_write(os.path.join(tmp, "config.json"), lambda fh: fh.write(conf))

        replace_dir(os.path.join(self.cfg.output_dir, BEST_DIR), fill)

    def _write_json(self, path: str, obj) -> None:
        if self.rank == 0:
            text = json.dumps(obj, indent=2)
            atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))

    def _report(self, name: str, m: dict) -> None:
        if self.rank == 0:
            from ..eval.metrics import METRIC_KEYS

            keys = list(METRIC_KEYS)
            print(
                f"[{name}] " + "  ".join(f"{k} {m[k]:.3f}" for k in keys if m.get(k) is not None),
                flush=True,
            )


def plot_curves(log_path: str, png_path: str) -> None:
    """Per-term losses, retrieval hit rate and gradient norms over steps."""
    if not os.path.lexists(log_path):
        return
    rows = []
    text = read_bytes(log_path).decode("utf-8", "replace")
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            row = _parse_log_line(line)
            if row is None:
                warn(f"{log_path}, line {i}: unparsable (torn by a crash?): skipped in the plot")
            else:
                rows.append(row)
    if not rows:
        return
    try:
        import matplotlib
    except ImportError:
        warn(f"matplotlib is not installed: no {png_path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key in ("loss", "generator", "retriever"):
        if key in rows[0]:
            axes[0].plot(steps, [r.get(key, math.nan) for r in rows], label=key)
    axes[0].set_title("losses")
    axes[0].legend()
    for key, label in (("retrieval_top1", "gold ranked first"), ("retrieval_hit", "gold in top K")):
        if key in rows[0]:
            vals = [r.get(key, math.nan) for r in rows]
            window = max(1, len(vals) // 10)  # moving average: batches are small
            smooth = [
                float(np.mean(vals[max(0, i - window + 1) : i + 1])) for i in range(len(vals))
            ]
            axes[1].plot(steps, smooth, label=label)
    axes[1].set_title("retrieval on training batches (moving avg)")
    if axes[1].lines:  # data without gold passages: nothing to show (legend() would warn)
        axes[1].legend()
    else:
        axes[1].text(
            0.5, 0.5, "no gold passages in the training data", ha="center",
            transform=axes[1].transAxes,
        )  # fmt: skip
    for key in ("grad_norm_generator", "grad_norm_retriever"):
        if key in rows[0]:
            axes[2].plot(steps, [r.get(key, math.nan) for r in rows], label=key)
    axes[2].set_yscale("log")
    axes[2].set_title("gradient norms")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)


def _parse_log_line(line: str) -> dict | None:
    """A train_log.jsonl row, or None if the line is not a JSON object with an int step."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("step"), int)
        or isinstance(row["step"], bool)
    ):
        return None
    return row


def read_metrics(path: str) -> dict:
    try:
        metrics = json.loads(read_bytes(path).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UserError(
            f"{path}: not valid JSON ({one_line(e)[:160]}); remove it to recompute "
            "the initial metrics"
        ) from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: expected a JSON object of metrics")
    return metrics


__all__ = ["CoTrainer", "TrainConfig", "plot_curves"]
