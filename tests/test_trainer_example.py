"""examples/trainer_rag.py: the RagTrainer pattern trains, and gradient accumulation gives the
same optimizer step as one big batch (also with uneven micro-batches: the loss is normalised
by the queries of the whole step, the num_items_in_batch semantics)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer_rag.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("trainer_rag_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def setup(ex):
    data = ex.toy_dataset()
    texts = [t for e in data for t in (e["question"], e["answer"], *e["documents"])]
    model, tok = ex.tiny_model_and_tokenizer(texts)
    return data, model, tok


def train(ex, model, tok, data, tmp_path, **kw):
    args = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        seed=0,
    )
    args.update(kw)
    trainer = ex.RagTrainer(
        model=model,
        args=transformers.TrainingArguments(**args),
        train_dataset=data,
        data_collator=ex.RagCollator(tok, max_doc_tokens=64),
    )
    trainer.train()
    return trainer


def eval_loss(ex, model, tok, data):
    inputs = ex.RagCollator(tok, max_doc_tokens=64)(data)
    batch = ex.rk.hf.RagBatch(**{f: inputs[f] for f in ex.RAG_FIELDS})
    with torch.no_grad():
        return float(ex.rk.hf.causal_rag_loss(model, batch, inputs["doc_scores"]))


def test_three_steps_with_accumulation_train(ex, setup, tmp_path):
    data, model0, tok = setup
    model = copy.deepcopy(model0)
    before = eval_loss(ex, model, tok, data)
    trainer = train(
        ex, model, tok, data, tmp_path, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=3e-3,
    )  # fmt: skip
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = [
        n
        for (n, p), p0 in zip(model.named_parameters(), model0.parameters(), strict=True)
        if not torch.equal(p, p0)
    ]
    assert len(changed) == len(list(model.parameters()))  # every parameter got a gradient
    assert eval_loss(ex, model, tok, data) < before
    assert trainer.evaluate(eval_dataset=data[:3])["eval_loss"] > 0  # prediction_step works


@pytest.mark.parametrize("n_examples", [4, 3], ids=["2+2_vs_4", "2+1_vs_3"])
def test_accumulation_equals_one_big_batch(ex, setup, tmp_path, n_examples):
    """One step of 2 accumulated micro-batches of (up to) 2 queries == one step on all of them.

    Exact in real arithmetic (SGD, same examples; the loss is the sum over the step's queries
    divided by their number), so equal to fp32 noise: the two runs pad differently."""
    data, model0, tok = setup
    data = data[:n_examples]
    params = {}
    for name, bs, ga in (("accum", 2, 2), ("big", 4, 1)):
        m = copy.deepcopy(model0)
        train(
            ex, m, tok, data, tmp_path / name, max_steps=1, per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        )  # fmt: skip
        params[name] = [
            (p - p0).detach() for p, p0 in zip(m.parameters(), model0.parameters(), strict=True)
        ]
    for a, b in zip(params["accum"], params["big"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(d.abs().max()) for d in params["big"]) > 1e-3  # the step did something


def test_main_runs(ex, tmp_path, capsys):
    losses = ex.main(["--steps", "2", "--output-dir", str(tmp_path)])
    assert len(losses) == 2 and all(x == x for x in losses)
    assert "loss per step" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--steps", "0"], "--steps"),  # transformers trained by epochs (1 or 6 steps)
        (["--steps", "-1"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--lr", "nan"], "--lr"),
        (["--model", "/nonexistent/model"], "--model"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_main_refuses_bad_arguments(ex, capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        ex.main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
