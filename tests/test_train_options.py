"""The training options of ``rag-kernels train`` added for "a co-training CLI users can trust":
each validated at parse time (one error line, exit 2, before any model loads), recorded in
the checkpoint; transformers' LR schedules step by step and exact resume with one; the IVF
index; --eval-every / best/; --precision autocast; gradient checkpointing; the prompt
template and answer truncation in the batch; the ADist / LOOP feedback; --help defaults,
--version, and the README's generated option table. Tiny random models throughout."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import rag_kernels as rk
from rag_kernels.cotrain.cli import main
from rag_kernels.cotrain.errors import UserError
from rag_kernels.cotrain.prompts import DEFAULT_PROMPT_TEMPLATE, format_prompt, template_problem
from rag_kernels.cotrain.training import CoTrainer, TrainConfig, build_parser, resolve_config
from rag_kernels.cotrain.training import checkpoint as ck
from rag_kernels.cotrain.training import loop as loop_module
from rag_kernels.cotrain.training.config import RESUME_FORCE_SAFE, flag_name
from rag_kernels.cotrain.training.feedback import (
    leave_one_out_nll,
    passage_attention,
    passage_token_mask,
)
from rag_kernels.cotrain.training.options_table import BEGIN, END, options_table, readme_table
from toolkit import cli_error_line, tiny_train_config
from toolkit import tiny_dataset as toolkit_tiny_dataset

faiss = pytest.importorskip("faiss")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--generator", "tiny-random", "--retriever", "tiny-random"]


def tiny_dataset(dev: bool = True):
    return toolkit_tiny_dataset(dev=dev)


def config(out, **kw) -> TrainConfig:
    return tiny_train_config(
        out, **(dict(skip_initial_eval=True, eval_limit=2, max_new_tokens=2) | kw)
    )


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


error_line = cli_error_line


# ------------------------------------------------------------------ 1. parse-time validation
BAD = [
    (["--retriever-objective", "attention"], "--retriever-objective"),
    (["--precision", "fp8"], "--precision"),
    (["--gradient-checkpointing", "sometimes"], "--gradient-checkpointing"),
    (["--eval-every", "-1"], "--eval-every -1: must be >= 0"),
    (["--eval-every", "2.5"], "--eval-every"),
    (["--best-metric", "loss"], "--best-metric"),
    (["--lr-schedule", "exponential"], "--lr-schedule"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be >= 0"),
    (["--ivf-nlist", "-1"], "--ivf-nlist -1: must be >= 0"),
    (["--ivf-nprobe", "-2"], "--ivf-nprobe -2: must be >= 0"),
    (["--ivf-nlist", "4", "--ivf-nprobe", "5"], "--ivf-nprobe 5: must be <= --ivf-nlist 4"),
    (["--ivf-nprobe", "2"], "--ivf-nprobe 2: needs an IVF index"),
    (["--index", "ivf", "--ivf-nprobe", "65"], "must be <= --ivf-nlist 64"),
    (["--max-answer-tokens", "-1"], "--max-answer-tokens -1: must be >= 0"),
    (["--retriever-max-length", "0"], "--retriever-max-length 0: must be >= 1"),
    (["--retriever-objective", "loop", "--docs", "1"], "loop needs --docs >= 2"),
    (["--refresh-every", "2"], "--refresh-every 2: needs --doc-encoder shared"),
    # nothing would ever get a gradient (the first step crashed in backward)
    (["--freeze-generator", "--retriever-weight", "0", "--retriever-objective", "pdist"],
     "--freeze-generator with --retriever-weight 0 leaves nothing to train"),
    (["--freeze-retriever", "--generator-weight", "0"],
     "--generator-weight 0 with --freeze-retriever leaves nothing to train"),
    (["--generator-weight", "0", "--retriever-weight", "0", "--balancing", "uncertainty"],
     "--generator-weight 0 with --retriever-weight 0 leaves nothing to train"),
    (["--generator-weight", "0", "--retriever-objective", "rag"],
     "--generator-weight 0 with --retriever-objective rag (the retriever learns inside"),
    (["--prompt-template", "Q: {question}"], "must contain {passage}"),
    (["--prompt-template", "no fields"], "must contain {passage} and {question}"),
    (["--prompt-template", "{passage} {question} {title}"], "found {title}"),
    (["--prompt-template", "{} {passage} {question}"], "positional field"),
    (["--prompt-template", "{passage!r} {question}"], "without a conversion"),
    (["--prompt-template", "{passage} {question"], "valid format string"),
]  # fmt: skip


@pytest.mark.parametrize("argv, expect", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_fail_at_parse_time(no_models, capsys, argv, expect):
    line = error_line(capsys, "train", *TINY, *argv, "--output-dir", "out")
    assert expect in line, line
    assert not os.path.exists("out"), "nothing may be written for an invalid option"


def test_bad_template_in_a_config_file_names_the_line(no_models, capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 1\nprompt_template = "Context: {passage}"\n')
    line = error_line(capsys, "train", *TINY, "--config", str(cfg))
    assert "c.toml, line 2: prompt_template: must contain {question}" in line, line


def test_config_file_sets_the_new_options(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "precision: bf16\ngradient-checkpointing: yes\nlr_schedule: cosine\nivf_nlist: 8\n"
        "ivf_nprobe: 8\neval_every: 5\nbest_metric: recall@1\nmax_answer_tokens: 4\n"
        "retriever_objective: adist\nprompt_template: |\n  Q: {question}\n  P: {passage}\n"
    )
    c = resolve_config(build_parser("t", "x").parse_args(["--config", str(cfg)]))
    assert (c.precision, c.gradient_checkpointing, c.lr_schedule) == ("bf16", True, "cosine")
    assert (c.ivf_nlist, c.ivf_nprobe, c.eval_every, c.best_metric) == (8, 8, 5, "recall@1")
    assert (c.max_answer_tokens, c.retriever_objective) == (4, "adist")
    assert c.prompt_template == "Q: {question}\nP: {passage}\n"


def test_new_option_error_imports_nothing_heavy(tmp_path):
    code = (
        "import sys, json\n"
        "from rag_kernels.cotrain.cli import main\n"
        "rc = main(['train', '--prompt-template', '{passage}', '--precision', 'bf16'])\n"
        "heavy = ['transformers', 'faiss', 'rag_kernels.cotrain.training.loop',\n"
        "         'rag_kernels.cotrain.models', 'rag_kernels.cotrain.retrieval']\n"
        "print(json.dumps([rc, [m for m in heavy if m in sys.modules]]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [2, []], p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "rag-kernels: error: --prompt-template {passage}: must contain {question}"
    ]


def test_template_helpers():
    assert template_problem(DEFAULT_PROMPT_TEMPLATE) is None
    assert DEFAULT_PROMPT_TEMPLATE.replace("{passage}", "{document}") == rk.hf.DEFAULT_RAG_PROMPT
    text, spans = format_prompt(
        "{{x}} {question}: {passage} / {passage}", passage="P", question="Q"
    )
    assert text == "{x} Q: P / P" and [text[a:b] for a, b in spans] == ["P", "P"]


def test_resume_rules_of_the_new_options():
    assert {"eval_every", "best_metric", "gradient_checkpointing"} <= set(RESUME_FORCE_SAFE)
    for name in ("precision", "lr_schedule", "warmup_steps", "ivf_nlist", "ivf_nprobe",
                 "max_answer_tokens", "prompt_template", "retriever_max_length",
                 "retriever_objective"):  # fmt: skip
        assert name not in RESUME_FORCE_SAFE, name


# ------------------------------------------------------------------ 2. --help, --version, README
def test_help_shows_every_default(capsys):
    ap = build_parser("rag-kernels train", "x")
    by_flag = {a.option_strings[0]: a for a in ap._actions if a.option_strings}
    for name in TrainConfig.__dataclass_fields__:
        assert "default" in by_flag[flag_name(name)].help, name
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "(default: constant)",
        "(default: auto)",
        "(default: f1)",
        "(default: 0.01)",
        "(default: runs/default)",
        "(default: false)",
        "(default: 'Context: {passage}\\nQuestion: {question}\\nAnswer with a few words.')",
    ):
        assert shown in text, shown


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rag-kernels {rk.__version__}"
    with pytest.raises(SystemExit) as e:
        main(["train", "--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"rag-kernels {rk.__version__}"


def test_readme_holds_the_generated_option_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    table = readme_table(text)
    assert table is not None, f"README.md needs one {BEGIN} ... {END} block"
    assert table == options_table(), (
        "README.md's option table is out of date: run "
        "python -m rag_kernels.cotrain.training.options_table --write README.md"
    )
    assert table.count("\n| `--") == len(TrainConfig.__dataclass_fields__)


# ------------------------------------------------------------------ 3. LR schedules, resume
def _transformers_lrs(schedule, base, warmup, total, n):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base)
    make = {
        "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, warmup),
        "linear": lambda: transformers.get_linear_schedule_with_warmup(opt, warmup, total),
        "cosine": lambda: transformers.get_cosine_schedule_with_warmup(opt, warmup, total),
    }[schedule]
    sched, out = make(), []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_is_transformers_step_by_step(tmp_path, schedule):
    cfg = config(tmp_path / "run", lr_schedule=schedule, warmup_steps=2, steps=6)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    tr.refresh_index()
    got = [tr.train_step() for _ in range(6)]
    for key, base in (("lr_generator", cfg.lr_generator), ("lr_retriever", cfg.lr_retriever)):
        want = _transformers_lrs(schedule, base, 2, 6, 6)
        assert [g[key] for g in got] == pytest.approx(want, rel=1e-12, abs=1e-15), key
    assert got[0]["lr_generator"] == 0.0  # transformers' warm-up starts at 0


def _stop_after(tr, step):
    train_step = tr.train_step

    def wrapped():
        logs = train_step()
        if tr.step == step:
            tr.request_stop()
        return logs

    tr.train_step = wrapped


def test_resume_is_exact_with_a_cosine_schedule(tmp_path):
    kw = dict(lr_schedule="cosine", warmup_steps=1, steps=4, retriever_objective="loop")
    ref = CoTrainer(config(tmp_path / "ref", **kw), dataset=tiny_dataset())
    ref.fit()
    want = read_log(tmp_path / "ref")

    out = tmp_path / "resumed"
    tr = CoTrainer(config(out, **kw), dataset=tiny_dataset())
    _stop_after(tr, 2)
    with pytest.raises(SystemExit) as e:
        tr.fit()
    assert e.value.code == 130
    st = ck.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert st["step"] == 2 and st["scheduler"]["last_epoch"] == 2
    assert st["config"]["lr_schedule"] == "cosine"
    CoTrainer(config(out, resume=True, **kw), dataset=tiny_dataset()).fit()
    got = read_log(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "generator", "retriever", "lr_generator", "lr_retriever"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)

    # the decay ends at --steps: a resume with other --steps would not continue this run
    with pytest.raises(UserError, match="--steps 4 → 8 with --lr-schedule cosine"):
        CoTrainer(config(out, resume=True, **dict(kw, steps=8)), dataset=tiny_dataset())


# ------------------------------------------------------------------ 4. the IVF index
def test_ivf_search_equals_flat_with_nprobe_nlist():
    from rag_kernels.cotrain.retrieval import DenseIndex

    g = torch.Generator().manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    flat = DenseIndex("flat").build(docs)
    ivf = DenseIndex("ivf", nlist=8, nprobe=8).build(docs)
    assert ivf._index.nlist == 8 and ivf._index.nprobe == 8
    s_flat, i_flat = flat.search(queries, 10)
    s_ivf, i_ivf = ivf.search(queries, 10)
    assert torch.equal(i_flat, i_ivf)
    torch.testing.assert_close(s_flat, s_ivf)
    few = DenseIndex("ivf", nlist=8, nprobe=1).build(docs)  # searches 1 cell of 8
    assert few._index.nprobe == 1


def test_ivf_options_build_the_index(tmp_path):
    tr = CoTrainer(config(tmp_path / "run", ivf_nlist=2, ivf_nprobe=2), dataset=tiny_dataset())
    tr.refresh_index()
    assert type(tr.index._index).__name__ == "IndexIVFFlat"
    assert (tr.index._index.nlist, tr.index._index.nprobe) == (2, 2)
    tr = CoTrainer(config(tmp_path / "flat"), dataset=tiny_dataset())
    tr.refresh_index()
    assert type(tr.index._index).__name__ == "IndexFlatIP"


# ------------------------------------------------------------------ 5. --eval-every and best/
def test_eval_every_keeps_the_best_model(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, eval_every=1, best_metric="mrr@10", steps=3, lr_retriever=5e-2)
    metrics = CoTrainer(cfg, dataset=tiny_dataset()).fit()
    log = read_log(out)
    dev = [r["dev_mrr@10"] for r in log]
    assert len(dev) == 3 and all("dev_f1" in r for r in log)
    best_step = 1 + max(range(3), key=lambda i: (dev[i], -i))  # the first of the best
    best = os.path.join(out, "best")
    assert sorted(os.listdir(best)) == ["checkpoint.pt", "config.json", "metrics.json"]
    with open(os.path.join(best, "metrics.json")) as fh:
        meta = json.load(fh)
    assert (meta["metric"], meta["step"]) == ("mrr@10", best_step)
    assert meta["value"] == pytest.approx(max(dev)) == meta["dev"]["mrr@10"]
    assert metrics["best"] == {k: meta[k] for k in ("metric", "value", "step")}
    st = ck.read_checkpoint(os.path.join(best, "checkpoint.pt"))
    assert st["step"] == best_step and st["best"]["step"] == best_step
    assert not [n for n in os.listdir(out) if n.startswith(".best")]  # no temp left


def test_eval_every_needs_a_dev_split(tmp_path):
    tr = CoTrainer(config(tmp_path / "run", eval_every=1), dataset=tiny_dataset(dev=False))
    with pytest.raises(UserError, match="--eval-every 1: the data has no dev split"):
        tr.fit()


# ------------------------------------------------------------------ 6. precision, checkpointing
@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])  # fmt: skip
def test_precision_autocasts_the_generator_on_cpu(tmp_path, precision, dtype):
    tr = CoTrainer(config(tmp_path / "run", precision=precision), dataset=tiny_dataset())
    tr.refresh_index()
    seen = []
    tr.generator.model.register_forward_hook(
        lambda *_: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
    )
    logs = tr.train_step()
    assert seen == [dtype] and math.isfinite(logs["loss"])
    assert not tr.scaler.is_enabled()  # the GradScaler is for fp16 on CUDA only


def _checkpointing(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5.x
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_steps(tmp_path):
    runs = []
    for on in (False, True):
        tr = CoTrainer(config(tmp_path / f"gc{on}", gradient_checkpointing=on),
                       dataset=tiny_dataset())  # fmt: skip
        for m in (tr.generator, tr.retriever.query_model):
            assert _checkpointing(m) is on
        tr.refresh_index()
        runs.append([tr.train_step() for _ in range(2)])
    for a, b in zip(*runs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


# ------------------------------------------------------------------ 7. batch, seeding, encoder
def test_prompt_template_and_answer_truncation_in_the_batch(tmp_path):
    from rag_kernels.cotrain.models import build_generator_batch

    tr = CoTrainer(config(tmp_path / "run"), dataset=tiny_dataset())
    tok = tr.tokenizer
    q, d, a = (
        ["Who built the tower of Varn?"],
        [["The tower of Varn was built by Oskar."]],
        ["Oskar Teodor Lina"],
    )
    default = build_generator_batch(tok, q, d, a, max_doc_tokens=32)
    same = build_generator_batch(tok, q, d, a, max_doc_tokens=32, prompt=DEFAULT_PROMPT_TEMPLATE)
    assert torch.equal(default.input_ids, same.input_ids)
    # the tiny word-level vocabulary knows only the data's words: a template of fields only
    custom = build_generator_batch(tok, q, d, a, max_doc_tokens=32, prompt="{question} {passage}")
    text = tok.decode(custom.input_ids[0][custom.attention_mask[0].bool()])
    assert text == (
        "[BOS] Who built the tower of Varn ? The tower of Varn was built by Oskar . "
        "Oskar Teodor Lina [EOS]"
    )
    assert (default.target[0] != -100).sum() == 4  # three words + EOS
    cut = build_generator_batch(tok, q, d, a, max_doc_tokens=32, max_answer_tokens=2)
    kept = cut.target[0][cut.target[0] != -100].tolist()
    assert kept == tok("Oskar Teodor", add_special_tokens=False)["input_ids"]  # no EOS: cut


def test_max_answer_tokens_reaches_the_training_batch(tmp_path, monkeypatch):
    seen = []
    real = loop_module.build_generator_batch

    def spy(*args, **kw):
        batch = real(*args, **kw)
        seen.append((kw, (batch.target != -100).sum(-1).tolist()))
        return batch

    monkeypatch.setattr(loop_module, "build_generator_batch", spy)
    tmpl = "P: {passage} Q: {question}"
    tr = CoTrainer(config(tmp_path / "run", max_answer_tokens=1, prompt_template=tmpl),
                   dataset=tiny_dataset())  # fmt: skip
    tr.refresh_index()
    tr.train_step()
    ((kw, lengths),) = seen
    assert kw["prompt"] == tmpl and kw["max_answer_tokens"] == 1 and lengths == [1, 1]
    assert tr._prompt_ids("Q?", "some passage")[:1] == [tr.tokenizer.bos_token_id]


def test_seeding_is_transformers_set_seed():
    CoTrainer._seed_everything(123)
    got = (random.random(), torch.rand(1).item())
    transformers.set_seed(123)
    assert got == (random.random(), torch.rand(1).item())


def test_retriever_max_length(tmp_path):
    from types import SimpleNamespace

    from rag_kernels.cotrain.retrieval.encoder import encoder_max_length

    tr = CoTrainer(config(tmp_path / "a"), dataset=tiny_dataset())
    assert tr.retriever.max_length == 128  # tiny-random's own
    tr = CoTrainer(config(tmp_path / "b", retriever_max_length=16), dataset=tiny_dataset())
    assert tr.retriever.max_length == 16
    model = SimpleNamespace(
        config=SimpleNamespace(max_position_embeddings=514, model_type="roberta")
    )
    assert encoder_max_length(model, SimpleNamespace(model_max_length=10**30)) == 512
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512, model_type="bert"))
    assert encoder_max_length(model, SimpleNamespace(model_max_length=384)) == 384
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    assert encoder_max_length(model, SimpleNamespace(), str(tmp_path)) == 256


# ------------------------------------------------------------------ 8. ADist and LOOP feedback
def test_loop_target_is_the_leave_one_out_nll():
    torch.manual_seed(0)
    B, K, T = 3, 4, 5
    scores = torch.randn(B, K)
    tok = torch.randn(B, K, T).clamp(max=0) - 0.1
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 3:] = False
    tok = torch.where(m[:, None, :], tok, torch.zeros(()))
    fb = rk.GeneratorFeedback(tok, tok.sum(-1), tok.sum(-1) / m.sum(-1, keepdim=True))
    for mode, loss in (("sequence", rk.rag_sequence_loss), ("token", rk.rag_token_loss)):
        got = leave_one_out_nll(scores, fb, m, mode)
        for k in range(K):
            keep = [j for j in range(K) if j != k]
            nll = loss(tok[:, keep], scores[:, keep], token_mask=m, reduction="none")
            torch.testing.assert_close(got[:, k], nll / m.sum(-1), msg=f"{mode} k={k}")


def test_adist_target_is_the_answer_attention_to_the_passage(tmp_path):
    from rag_kernels.cotrain.models import build_generator_batch

    tr = CoTrainer(config(tmp_path / "run"), dataset=tiny_dataset())
    tok = tr.tokenizer
    qs = ["Who built the tower of Varn?", "Who built the tower of Hesk?"]
    docs = [["The tower of Varn was built by Oskar.", "The tower of Hesk was built by Teodor."]] * 2
    tmpl = "Q: {question} P: {passage} again: {passage}"
    batch = build_generator_batch(tok, qs, docs, ["Oskar", "Teodor"], max_doc_tokens=4,
                                  prompt=tmpl)  # fmt: skip
    mask = passage_token_mask(tok, batch, qs, docs, tmpl, 4)
    for r in range(4):
        words = tok.decode(batch.input_ids[r][mask[r]]).split()
        passage = tok.decode(tok(docs[r // 2][r % 2], add_special_tokens=False)["input_ids"][:4])
        assert words == passage.split() * 2, (r, words)
    # the average over layers, heads and answer positions of the mass on the passage
    BK, L = batch.input_ids.shape
    att = [torch.softmax(torch.randn(BK, 2, L, L), -1) for _ in range(3)]
    got = passage_attention(att, mask, batch.target, 2)
    for r in range(BK):
        pos = (batch.target[r // 2] != -100).nonzero().flatten()
        want = torch.stack([a[r][:, pos][..., mask[r]].sum(-1).mean() for a in att]).mean()
        torch.testing.assert_close(got[r // 2, r % 2], want)


@pytest.mark.parametrize("objective", ["adist", "loop"])
def test_new_objectives_train_the_query_encoder(tmp_path, objective):
    tr = CoTrainer(config(tmp_path / "run", retriever_objective=objective),
                   dataset=tiny_dataset())  # fmt: skip
    tr.refresh_index()
    before = [p.detach().clone() for p in tr.ret_params]
    logs = tr.train_step()
    assert math.isfinite(logs["retriever"]) and logs["retriever"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.ret_params, strict=True))
    if objective == "adist":
        assert tr.generator.config._attn_implementation == "eager"


def test_max_new_tokens_beyond_the_generators_positions_is_refused(tmp_path):
    """--max-new-tokens 100000000 was accepted: evaluation then decoded past the generator's
    learned positions for minutes. It is refused once the generator is loaded."""
    cfg = tiny_train_config(tmp_path / "run", max_new_tokens=10**8)
    with pytest.raises(UserError, match=r"^--max-new-tokens 100000000: the generator holds at"):
        CoTrainer(cfg, dataset=toolkit_tiny_dataset())


def test_a_step_with_nothing_to_train_is_skipped(tmp_path):
    """--freeze-generator while the retriever's freeze lasts: no loss term carries a gradient.
    The step crashed in backward ("element 0 of tensors does not require grad"); now it
    updates nothing, and training goes on once the freeze ends."""
    tr = CoTrainer(
        config(tmp_path / "run", steps=3, freeze_generator=True, retriever_freeze_steps=2),
        dataset=tiny_dataset(),
    )
    before = {k: v.clone() for k, v in tr.retriever.query_model.state_dict().items()}
    tr.refresh_index()
    tr.train_step()
    tr.train_step()
    frozen = tr.retriever.query_model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in frozen.items())
    tr.train_step()  # the freeze is over: the retriever trains
    after = tr.retriever.query_model.state_dict()
    assert not all(torch.equal(before[k], v) for k, v in after.items())
