"""The co-training loop: retrieve top-K, generator loss through the fused RAG loss, retriever
objective from the generator's feedback, combined by ``CoTrainingLoss``.

One training step, in the order the code runs it (``CoTrainer.train_step``):

1. encode the questions with the (trainable) query encoder; search the FAISS index for
   ``rerank * K`` candidates with the detached query vectors; score them
   ``s = score_scale * q . d`` (differentiable in q) and keep the top K;
2. format (document, question) prompts with the answer as target, left-padded so the
   answer occupies the same positions for the K documents of a question;
3. last-layer hidden states + the LM-head weight -> ``rk.rag_loss`` (no logits);
4. the retriever objective (``--retriever-objective``) from ``rk.generator_feedback``
   (detached); ``rag`` uses the RAG loss's own gradient to the doc scores instead;
5. ``CoTrainingLoss`` combines both; backward; gradient all-reduce across ranks when run
   under ``torchrun``; clipping; AdamW step with separate learning rates.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time

import numpy as np
import torch

import rag_kernels as rk
from rag_kernels.losses import retriever as R
from rag_kernels.losses.cotraining import CoTrainingLoss

from ..models import build_generator_batch, load_generator, prompt_ids
from ..retrieval import DenseIndex, load_retriever

from .config import TrainConfig

CHECKPOINT = "checkpoint.pt"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def setup_distributed() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and _dist() is None:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def load_dataset(cfg: TrainConfig):
    from ..data import Dataset, load_corpus, load_default, load_qa

    if cfg.corpus is None:
        ds = load_default(seed=cfg.data_seed)
    else:
        ds = Dataset(corpus=load_corpus(cfg.corpus), train=[], dev=[], test=[])
    ids = {p.id for p in ds.corpus}
    if cfg.train:
        ds.train = load_qa(cfg.train, corpus_ids=ids)
    if cfg.eval:
        ds.test = load_qa(cfg.eval, corpus_ids=ids)
    return ds


def passage_text(p) -> str:
    return f"{p.title}. {p.text}" if p.title else p.text


class CoTrainer:
    def __init__(self, cfg: TrainConfig, dataset=None):
        self.cfg = cfg
        self.rank, self.world = setup_distributed()
        self.device = torch.device("cuda", self.rank % max(1, torch.cuda.device_count())) \
            if torch.cuda.is_available() else torch.device("cpu")
        self._seed_everything(cfg.seed)
        self.data = dataset if dataset is not None else load_dataset(cfg)
        if not self.data.train and cfg.steps > 0:
            raise ValueError("no training questions: pass --train or use the embedded default")
        if cfg.retriever_objective == "contrastive" and any(not ex.positive_ids for ex in self.data.train):
            raise ValueError("--retriever-objective contrastive needs positive_ids on every training question")
        self.texts = [passage_text(p) for p in self.data.corpus]
        self.pid_to_row = {p.id: i for i, p in enumerate(self.data.corpus)}
        corpus_texts = self.texts + [ex.question + " " + " ".join(ex.answers) for ex in self.data.train]

        torch.manual_seed(cfg.seed)  # tiny-random models are built from this seed
        self.generator, self.tokenizer = load_generator(cfg.generator, corpus_texts=corpus_texts)
        self.generator.to(self.device)
        self.retriever = load_retriever(cfg.retriever, doc_encoder=cfg.doc_encoder,
                                        corpus_texts=corpus_texts).to(self.device)
        self._set_trainable()
        self.combine = CoTrainingLoss(
            generator_weight=cfg.generator_weight, retriever_weight=cfg.retriever_weight,
            balancing=cfg.balancing, retriever_freeze_steps=cfg.retriever_freeze_steps,
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
        self.optimizer = torch.optim.AdamW(groups or [{"params": [torch.zeros(1, requires_grad=True)]}],
                                           weight_decay=cfg.weight_decay)
        warm = max(1, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.index = DenseIndex(kind=cfg.index, use_gpu=self.device.type == "cuda")
        self.step = 0
        self.cursor = 0  # questions consumed (global, across ranks): the data position
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.log_path = os.path.join(cfg.output_dir, "train_log.jsonl")

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _set_trainable(self) -> None:
        cfg = self.cfg
        g = self.generator
        g.requires_grad_(False)
        if not cfg.freeze_generator:
            if cfg.generator_train_layers < 0:
                g.requires_grad_(True)
            else:
                layers = g.model.layers
                for layer in layers[len(layers) - cfg.generator_train_layers:]:
                    layer.requires_grad_(True)
                g.model.norm.requires_grad_(True)
        self.gen_params = [p for p in g.parameters() if p.requires_grad]
        q = self.retriever.query_model
        q.requires_grad_(not cfg.freeze_retriever)
        self.ret_params = [p for p in q.parameters() if p.requires_grad]

    def refresh_index(self) -> None:
        self.retriever.eval()
        with torch.no_grad():
            emb = self.retriever.encode_docs(self.texts, progress=self.cfg.progress and self.rank == 0)
        self.index.build(emb)

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, questions: list[str], k: int, *, grad: bool):
        """Top-k documents: ``(rows [B,k], scores [B,k])``; scores differentiable if ``grad``."""
        cfg = self.cfg
        with torch.set_grad_enabled(grad):
            q = self.retriever.encode_queries(questions)
        n_cand = min(len(self.texts), k * max(1, cfg.rerank))
        _, cand = self.index.search(q, n_cand)
        cand = cand.to(self.device)
        if self.retriever.doc_mode == "shared" and grad:
            flat = [self.texts[i] for i in cand.reshape(-1).tolist()]
            d = self.retriever.encode_docs(flat, grad=True).view(*cand.shape, -1)
        else:
            d = self.index.embeddings.to(self.device)[cand]
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
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch))
            out.append(self.data.train[int(perm[off])])
        self.cursor += b * self.world
        return out

    def micro_step(self, examples: list) -> dict:
        cfg = self.cfg
        K = min(cfg.docs, len(self.texts))
        retr_active = not cfg.freeze_retriever and self.combine.retriever_active(self.step)
        rows, scores, q = self.retrieve([ex.question for ex in examples], K, grad=not cfg.freeze_retriever)
        docs = [[self.texts[i] for i in r] for r in rows.tolist()]
        batch = build_generator_batch(self.tokenizer, [ex.question for ex in examples], docs,
                                      [ex.answers[0] for ex in examples], max_doc_tokens=cfg.max_doc_tokens)
        dev = self.device
        target = batch.target.to(dev)
        weight = self.generator.lm_head.weight
        rag_scores = scores if (retr_active and cfg.retriever_objective == "rag") else scores.detach()
        # bf16 autocast on CUDA: the generator and the fused LM head (rk ops follow autocast)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = self.generator.model(input_ids=batch.input_ids.to(dev),
                                       attention_mask=batch.attention_mask.to(dev),
                                       position_ids=batch.position_ids.to(dev))
            hidden = out.last_hidden_state[:, :-1]
            B = len(examples)
            hidden = hidden.reshape(B, K, hidden.shape[1], hidden.shape[2])
            gen_loss = rk.rag_loss(hidden, weight, target, rag_scores, mode=cfg.mode,
                                   label_smoothing=cfg.label_smoothing)
            ret_loss = None
            if not cfg.freeze_retriever and cfg.retriever_objective != "rag":
                ret_loss = self._retriever_objective(hidden.detach(), weight, target, scores, q,
                                                     examples)
        res = self.combine(gen_loss, ret_loss, step=self.step,
                           grad_wrt=[scores] if cfg.balancing == "gradnorm" else None)
        (res.loss / cfg.grad_accum).backward()
        logs = res.as_dict()
        gold = [set(self.pid_to_row.get(p, -1) for p in ex.positive_ids) for ex in examples]
        if any(gold):  # on this batch: gold passage ranked first / anywhere in the top K
            r = rows.tolist()
            logs["retrieval_top1"] = float(np.mean([x[0] in g for g, x in zip(gold, r, strict=False)]))
            logs["retrieval_hit"] = float(np.mean([bool(g & set(x)) for g, x in zip(gold, r, strict=False)]))
        return logs

    def _retriever_objective(self, hidden, weight, target, scores, q, examples):
        cfg = self.cfg
        fb = rk.generator_feedback(hidden, weight, target)
        m = target != -100
        tau_s, tau_g = cfg.retriever_temperature, cfg.generator_temperature
        if cfg.retriever_objective == "emdr2":
            return R.emdr2_loss(scores, fb.token_logprobs, token_mask=m, level="token",
                                retriever_temperature=tau_s)
        if cfg.retriever_objective == "pdist":
            return R.pdist_loss(scores, fb.mean_logprob, retriever_temperature=tau_s,
                                generator_temperature=tau_g)
        if cfg.retriever_objective == "lsr":
            return R.lsr_loss(scores, fb.sum_logprob, retriever_temperature=tau_s, lm_temperature=tau_g)
        # contrastive: in-batch negatives over the gold passages' (frozen-index) embeddings
        pos_rows = torch.tensor([self.pid_to_row[ex.positive_ids[0]] for ex in examples], device=self.device)
        d = self.index.embeddings.to(self.device)[pos_rows]
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
                d.all_reduce(p.grad)
                p.grad /= self.world
        norms = {}
        for name, ps in (("generator", self.gen_params), ("retriever", self.ret_params)):
            if ps:
                clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                norms[f"grad_norm_{name}"] = float(torch.nn.utils.clip_grad_norm_(ps, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if cfg.refresh_every and self.retriever.doc_mode == "shared" and self.step % cfg.refresh_every == 0:
            self.refresh_index()
        return norms

    def train_step(self) -> dict:
        self.generator.train()
        self.retriever.query_model.train(not self.cfg.freeze_retriever)
        t0 = time.perf_counter()
        acc: dict[str, list[float]] = {}
        for _ in range(self.cfg.grad_accum):
            for key, val in self.micro_step(self._batch()).items():
                acc.setdefault(key, []).append(val)
        logs = {k: float(np.mean(v)) for k, v in acc.items()}
        logs.update(self.optimizer_step())
        dt = time.perf_counter() - t0
        logs.update(step=self.step, seconds=dt,
                    questions_per_s=self.cfg.batch_size * self.cfg.grad_accum * self.world / dt,
                    lr_generator=self._lr("generator"), lr_retriever=self._lr("retriever"))
        return logs

    def _lr(self, name: str) -> float | None:
        return next((g["lr"] for g in self.optimizer.param_groups if g.get("name") == name), None)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, examples: list, *, desc: str = "eval") -> dict:
        from ..eval import evaluate_all

        cfg = self.cfg
        if cfg.eval_limit:
            examples = examples[: cfg.eval_limit]
        self.generator.eval()
        self.retriever.eval()
        ranked, retrieved_texts, predictions = [], [], []
        k_eval = min(20, len(self.texts))
        bs = cfg.eval_batch_size
        chunks = range(0, len(examples), bs)
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=desc, unit="batch", leave=False)
        for i in chunks:
            part = examples[i:i + bs]
            rows, _, _ = self.retrieve([ex.question for ex in part], k_eval, grad=False)
            for r in rows.tolist():
                ranked.append([self.data.corpus[j].id for j in r])
                retrieved_texts.append([self.texts[j] for j in r[: cfg.docs]])
            predictions += self.generate([ex.question for ex in part], [self.texts[r[0]] for r in rows.tolist()])
        return evaluate_all(
            ranked_ids=ranked, positive_ids=[ex.positive_ids for ex in examples],
            predictions=predictions, answers=[ex.answers for ex in examples],
            retrieved_texts=retrieved_texts,
        ) | {"n": len(examples)}

    def generate(self, questions: list[str], documents: list[str]) -> list[str]:
        tok = self.tokenizer
        prompts = [prompt_ids(tok, q, d, max_doc_tokens=self.cfg.max_doc_tokens) for q, d in zip(questions, documents, strict=False)]
        L = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(prompts), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        out = self.generator.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                      pad_token_id=pad, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, L:], skip_special_tokens=True)
        return [t.strip().split("\n")[0].strip() for t in texts]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        # Frozen weights are reloaded from their source; only what trains is saved.
        def trainable(m):
            return {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}

        return {
            "step": self.step, "cursor": self.cursor, "config": self.cfg.to_dict(),
            "generator": trainable(self.generator), "retriever": trainable(self.retriever.query_model),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "combine": self.combine.state_dict(),
            "index": self.index.state_dict() if self.retriever.doc_mode == "shared" else None,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save_checkpoint(self) -> str:
        if self.rank != 0:
            return ""
        path = os.path.join(self.cfg.output_dir, CHECKPOINT)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
        return path

    def load_checkpoint(self, path: str) -> None:
        st = torch.load(path, map_location=self.device, weights_only=False)
        self.generator.load_state_dict(st["generator"], strict=False)
        self.retriever.query_model.load_state_dict(st["retriever"], strict=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.combine.load_state_dict(st["combine"])
        if st["index"] is not None:
            self.index.load_state_dict(st["index"])
        self.step, self.cursor = st["step"], st["cursor"]
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])

    # ------------------------------------------------------------------ the whole run
    def fit(self) -> dict:
        cfg = self.cfg
        ckpt = os.path.join(cfg.output_dir, CHECKPOINT)
        metrics_path = os.path.join(cfg.output_dir, "metrics.json")
        metrics = {}
        resumed = cfg.resume and os.path.exists(ckpt)
        if resumed and os.path.exists(metrics_path):
            with open(metrics_path) as fh:
                metrics = json.load(fh)
        if not resumed or self.index.embeddings is None:
            self.refresh_index()
        if resumed:
            self.load_checkpoint(ckpt)
            if self.index.embeddings is None:
                self.refresh_index()
        elif os.path.exists(self.log_path) and self.rank == 0:
            os.remove(self.log_path)
        if not cfg.skip_initial_eval and "initial" not in metrics:
            metrics["initial"] = self.evaluate(self.data.test, desc="initial eval")
            self._report("initial", metrics["initial"])
            self._write_json(metrics_path, metrics)
        interrupted = False
        previous = signal.getsignal(signal.SIGINT)
        try:
            bar = range(self.step, cfg.steps)
            if cfg.progress and self.rank == 0:
                from tqdm.auto import tqdm

                bar = tqdm(bar, desc="co-training", initial=self.step, total=cfg.steps, unit="step")
            for _ in bar:
                logs = self.train_step()
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    with open(self.log_path, "a") as fh:
                        fh.write(json.dumps(logs) + "\n")
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{logs['loss']:.3f}", top1=f"{logs.get('retrieval_top1', float('nan')):.2f}",
                                    qps=f"{logs['questions_per_s']:.2f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True
            path = self.save_checkpoint()
            print(f"\ninterrupted at step {self.step}: checkpoint written to {path}; "
                  f"continue with --resume --output-dir {cfg.output_dir}")
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise SystemExit(130)
        self.save_checkpoint()
        metrics["final"] = self.evaluate(self.data.test, desc="final eval")
        self._report("final", metrics["final"])
        if self.rank == 0:
            self._write_json(metrics_path, metrics)
            self._write_json(os.path.join(cfg.output_dir, "config.json"), cfg.to_dict())
            plot_curves(self.log_path, os.path.join(cfg.output_dir, "curves.png"))
        return metrics

    def _write_json(self, path: str, obj) -> None:
        if self.rank == 0:
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(obj, fh, indent=2)
            os.replace(tmp, path)

    def _report(self, name: str, m: dict) -> None:
        if self.rank == 0:
            keys = ["recall@1", "recall@5", "recall@20", "mrr@10", "em", "f1", "rougeL", "bleu", "grounding"]
            print(f"[{name}] " + "  ".join(f"{k} {m[k]:.3f}" for k in keys if m.get(k) is not None), flush=True)


def plot_curves(log_path: str, png_path: str) -> None:
    """Per-term losses, retrieval hit rate and gradient norms over steps."""
    if not os.path.exists(log_path):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    if not rows:
        return
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
            smooth = [float(np.mean(vals[max(0, i - window + 1): i + 1])) for i in range(len(vals))]
            axes[1].plot(steps, smooth, label=label)
    axes[1].set_title("retrieval on training batches (moving avg)")
    axes[1].legend()
    for key in ("grad_norm_generator", "grad_norm_retriever"):
        if key in rows[0]:
            axes[2].plot(steps, [r.get(key, math.nan) for r in rows], label=key)
    axes[2].set_yscale("log")
    axes[2].set_title("gradient norms")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


__all__ = ["CoTrainer", "TrainConfig", "plot_curves"]
