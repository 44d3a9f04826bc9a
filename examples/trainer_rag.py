"""Fine-tune a causal LM on retrieved documents with ``transformers.Trainer`` and the fused RAG
loss: no ``[B·K, T, V]`` logits are ever formed.

    python examples/trainer_rag.py --steps 3                 # tiny random Llama, CPU, seconds
    python examples/trainer_rag.py --model /path/to/llm      # a local transformers causal LM

The pattern, in three pieces:

* a dataset of examples ``{"question": str, "documents": [K str], "answer": str,
  "doc_scores": [K float]}`` — the K retrieved documents and the retriever's scores for them,
  precomputed (BM25, a dense retriever, ...);
* :class:`RagCollator` turns a list of examples into the tensors of an ``rk.hf.RagBatch``
  (left-padded (question, document) prompts, the tokenizer's chat template when it has one,
  the answer as the target) plus ``doc_scores [B, K]``;
* :class:`RagTrainer` overrides ``compute_loss``: ``rk.hf.causal_rag_loss`` runs the model's
  base (``rk.hf.rag_hidden``, no LM head) and ``rk.rag_loss`` with the model's own head
  (weight, bias, softcap), RAG-Sequence or RAG-Token.

Mixed precision: ``TrainingArguments(bf16=True)`` (set below where the GPU has bf16).
accelerate implements it by wrapping the model's top-level ``forward`` in autocast, which
``rag_hidden`` does not call, so ``compute_loss`` enters ``self.accelerator.autocast()``
itself; the rag_kernels ops follow ``torch.autocast`` (bf16 matmuls, fp32 accumulation/loss).

Gradient accumulation and ``num_items_in_batch``: the loss is the mean over *queries* of the
per-query RAG loss (``-log p(answer | question)`` marginalised over the K documents). The
Trainer's own ``num_items_in_batch`` counts ``labels`` tokens, which this batch does not have,
so :meth:`RagTrainer.get_batch_samples` counts the queries of the whole optimizer step (all
its micro-batches, and all processes when ``average_tokens_across_devices``) and
``compute_loss`` returns ``sum of per-query losses / that count``, marked as already scaled
for accumulation. One optimizer step then sees exactly the gradient of the mean over all its
queries, also when micro-batches have different sizes (the last batch of an epoch): 2
micro-batches of 2 queries equal one batch of 4, and 2 + 1 equal 3.

Plugging in a trainable retriever: override :meth:`RagTrainer.doc_scores`, which returns the
``[B, K]`` scores for a batch. For example, with a query encoder ``self.retriever`` and the
documents' embeddings stored in the dataset (or re-encoded by a document encoder)::

    class RetrieverRagTrainer(RagTrainer):
        def __init__(self, *a, retriever, **kw):
            super().__init__(*a, **kw)
            self.retriever = retriever

        def doc_scores(self, model, inputs):
            q = self.retriever(**inputs["question_inputs"])          # [B, D], with grad
            return 20.0 * torch.einsum("bd,bkd->bk", q, inputs["doc_embeddings"])

Its collator must add ``question_inputs`` / ``doc_embeddings`` to the batch; the retriever's
parameters must be in the optimizer (pass ``optimizers=(opt, None)``, or make the retriever a
submodule of one ``nn.Module`` holding both models, so ``create_optimizer`` finds it), and
under DDP it needs its own ``DistributedDataParallel`` wrapper. The RAG loss then trains the
retriever with the document posterior (EMDR²-style); ``rk.retriever`` has other objectives.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

import rag_kernels as rk

RAG_FIELDS = tuple(f.name for f in dataclasses.fields(rk.hf.RagBatch))
EXAMPLE_KEYS = ("question", "documents", "answer", "doc_scores")


@dataclass
class RagCollator:
    """``[{"question", "documents", "answer", "doc_scores"}] -> dict`` of a ``RagBatch``'s
    fields plus ``doc_scores [B, K]`` (float32)."""

    tokenizer: Any
    prompt: Any = None  # None, a format string with {question} and {document}, or a callable
    chat_template: bool = True
    max_doc_tokens: int | None = 256
    max_answer_tokens: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        for i, ex in enumerate(examples):
            missing = [k for k in EXAMPLE_KEYS if k not in ex]
            if missing:
                raise KeyError(
                    f"RagCollator: example {i} lacks {missing} (has {sorted(ex)}); if the Trainer "
                    "removed them, set TrainingArguments(remove_unused_columns=False)"
                )
        batch = rk.hf.build_rag_batch(
            self.tokenizer,
            [ex["question"] for ex in examples],
            [list(ex["documents"]) for ex in examples],
            [ex["answer"] for ex in examples],
            prompt=self.prompt,
            chat_template=self.chat_template,
            max_doc_tokens=self.max_doc_tokens,
            max_answer_tokens=self.max_answer_tokens,
        )
        scores = torch.tensor([list(map(float, ex["doc_scores"])) for ex in examples])
        if tuple(scores.shape) != (len(examples), batch.n_docs):
            raise ValueError(
                f"RagCollator: doc_scores must hold one score per document, shape "
                f"{(len(examples), batch.n_docs)}, got {tuple(scores.shape)}"
            )
        # doc_scores first: Trainer takes the first tensor's length as the batch size (B)
        return {"doc_scores": scores, **{f: getattr(batch, f) for f in RAG_FIELDS}}


class RagTrainer(Trainer):
    """``Trainer`` whose loss is ``rk.hf.causal_rag_loss`` on the batches of :class:`RagCollator`.

    ``rag_mode``: ``"sequence"`` (RAG-Sequence) or ``"token"`` (RAG-Token);
    ``label_smoothing``: ε of ``rk.rag_loss``. See the module docstring for gradient
    accumulation, mixed precision and a trainable retriever.
    """

    def __init__(self, *args, rag_mode: str = "sequence", label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rag_mode = rag_mode
        self.label_smoothing = label_smoothing
        self._query_scale = 1
        # The collator needs the raw text fields; Trainer would drop every field that is not
        # an argument of model.forward before collating.
        self.args.remove_unused_columns = False

    def doc_scores(self, model, inputs: dict) -> torch.Tensor:
        """``[B, K]`` retriever scores for the batch: the dataset's precomputed ones.
        Override to compute them with a trainable retriever (module docstring)."""
        return inputs["doc_scores"]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, and the number of queries in them."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        n = torch.tensor(sum(len(b["doc_scores"]) for b in batches), device=device)
        self._query_scale = 1
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # as Trainer does for tokens: normalise by the global count; DDP averages the
            # gradients over the processes, so each process's loss is scaled back up
            n = self.accelerator.gather(n).sum()
            self._query_scale = self.accelerator.num_processes
        return batches, n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = rk.hf.RagBatch(**{f: inputs[f] for f in RAG_FIELDS})
        with self.accelerator.autocast():
            per_query = rk.hf.causal_rag_loss(
                model,
                batch,
                self.doc_scores(model, inputs),
                mode=self.rag_mode,
                label_smoothing=self.label_smoothing,
                reduction="none",
            )  # [B]
        if num_items_in_batch is None:
            # evaluation: the batch mean; the Trainer divides by the accumulation steps itself
            loss = per_query.mean()
        else:
            # training: normalised by the queries of the whole optimizer step already
            loss = per_query.sum() * (self._query_scale / num_items_in_batch)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, {"per_query_loss": per_query.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the mean RAG loss of the batch (no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# ------------------------------------------------------------------------------------------
# A toy run: a tiny random Llama on a few synthetic facts, with word-overlap retrieval scores
# ------------------------------------------------------------------------------------------

TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}[BOS] assistant :{% endif %}"
)


def toy_dataset(n: int = 8, k: int = 3) -> list[dict]:
    """``n`` questions "Who built the tower of X?", each with the gold passage and ``k - 1``
    distractors, scored by word overlap with the question (a stand-in for a retriever)."""
    places = ["Varn", "Hesk", "Dorrow", "Quellen", "Sotha", "Ilva", "Brell", "Maribet", "Osk"]
    makers = ["Oskar", "Teodor", "Lina", "Mirza", "Pell", "Ruun", "Aska", "Bo", "Vell"]
    passages = [
        f"The tower of {p} was built by {m} in spring ."
        for p, m in zip(places, makers, strict=True)
    ]
    out = []
    for i in range(n):
        j = i % len(places)
        q = f"Who built the tower of {places[j]} ?"
        docs = [passages[(j + d) % len(passages)] for d in range(k)]
        docs = docs[i % k :] + docs[: i % k]  # the gold passage is not always first
        qw = set(q.lower().split())
        scores = [float(len(qw & set(d.lower().split()))) for d in docs]
        out.append({"question": q, "documents": docs, "answer": makers[j], "doc_scores": scores})
    return out


def tiny_model_and_tokenizer(texts: list[str], seed: int = 0):
    """A 2-layer random Llama and a word-level tokenizer fitted on ``texts`` (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    extra = ["Context : Question Answer with a few words . user assistant"]
    tok.train_from_iterator(texts + extra, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]",
    )  # fmt: skip
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg), tokenizer


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _positive(kind):
    """argparse type: a finite ``kind`` > 0 (transformers trains by epochs for max_steps <= 0)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
        return v

    return parse


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=_positive(int), default=3, help="optimizer steps (>= 1)")
    ap.add_argument("--model", default=None, help="a local causal LM (default: tiny random)")
    ap.add_argument("--batch-size", type=_positive(int), default=2, help="queries per micro-batch")
    ap.add_argument("--grad-accum", type=_positive(int), default=2, help="micro-batches per step")
    ap.add_argument("--lr", type=_positive(float), default=3e-3)
    ap.add_argument("--mode", choices=("sequence", "token"), default="sequence")
    ap.add_argument("--output-dir", default=None, help="Trainer output dir (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.model is not None and not os.path.isdir(a.model):
        ap.error(f"--model {a.model}: no such model directory")

    data = toy_dataset()
    if a.model is None:
        texts = [t for ex in data for t in (ex["question"], ex["answer"], *ex["documents"])]
        model, tokenizer = tiny_model_and_tokenizer(texts)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model)
    own_dir = a.output_dir is None  # a temp dir of ours, removed at the end (save_strategy no)
    out = a.output_dir or tempfile.mkdtemp(prefix="trainer_rag_")
    args = TrainingArguments(
        output_dir=out,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=bf16_available(),
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # RagTrainer forces this too: the collator needs the text
        disable_tqdm=True,
    )
    trainer = RagTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=RagCollator(tokenizer, max_doc_tokens=64),
        rag_mode=a.mode,
    )
    try:
        trainer.train()
    finally:
        if own_dir:
            shutil.rmtree(out, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("loss per step:", " ".join(f"{x:.4f}" for x in losses))
    return losses


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
