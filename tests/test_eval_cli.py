"""``rag-kernels eval``: evaluation options only, the run's configuration and checkpoint,
predictions.jsonl; marginal (RAG-Sequence / RAG-Token) decoding against brute force."""

import json
import os
import shutil

import pytest
import torch

from rag_kernels.cotrain.cli import main
from rag_kernels.cotrain.data import Passage, QAExample, write_corpus, write_qa
from rag_kernels.cotrain.eval.decoding import (
    rag_sequence_decode,
    rag_token_decode,
    score_candidates,
)
from rag_kernels.cotrain.eval.predictions import read_predictions
from rag_kernels.cotrain.training import loop as loop_module

pytest.importorskip("faiss")

TINY = ["--generator", "tiny-random", "--retriever", "tiny-random"]
K = 3


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("rag-kernels: error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny-random run (sequence mode) on a small corpus, trained once."""
    d = tmp_path_factory.mktemp("eval_cli")
    names = ["Varn", "Hesk", "Dorrow", "Quellen", "Sotha", "Ilva", "Brell", "Maribet"]
    makers = ["Oskar", "Teodor", "Lina", "Mirza", "Pell", "Ruun", "Aska", "Bo"]
    corpus = [
        Passage(f"p{i}", n, f"The tower of {n} was built by {m} in spring.")
        for i, (n, m) in enumerate(zip(names, makers, strict=True))
    ]
    qa = [
        QAExample(f"q{i}", f"Who built the tower of {n}?", [m], [f"p{i}"])
        for i, (n, m) in enumerate(zip(names, makers, strict=True))
    ]
    data = {k: str(d / f"{k}.jsonl") for k in ("corpus", "train", "eval")}
    write_corpus(data["corpus"], corpus)
    write_qa(data["train"], qa[:6])
    write_qa(data["eval"], qa[3:])
    out = str(d / "run")
    args = [
        "train",
        *TINY,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--docs",
        str(K),
        "--max-new-tokens",
        "3",
        "--eval-batch-size",
        "2",
        "--lr-generator",
        "1e-3",
        "--skip-initial-eval",
        "--progress",
        "false",
        "--output-dir",
        out,
        *[x for k, v in data.items() for x in (f"--{k}", v)],
    ]
    assert main(args) == 0
    return {"out": out, "data": data, "questions": qa[3:], "corpus": {p.id for p in corpus}}


def eval_cli(capsys, *argv) -> tuple[str, dict]:
    """Run ``eval``; assert exit 0; return (the 'loaded' line, the metrics printed last)."""
    assert main(["eval", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    loaded = next(ln for ln in lines if ln.startswith("eval: loaded "))
    return loaded, json.loads(lines[-1])


def check_predictions(run, n: int) -> list[dict]:
    recs = read_predictions(os.path.join(run["out"], "predictions.jsonl"))
    assert len(recs) == n
    for rec, ex in zip(recs, run["questions"], strict=False):
        assert set(rec) == {"id", "question", "gold_answers", "prediction", "retrieved"}
        assert (rec["id"], rec["question"], rec["gold_answers"]) == (
            ex.id,
            ex.question,
            ex.answers,
        )
        assert isinstance(rec["prediction"], str)
        ids = [r["id"] for r in rec["retrieved"]]
        scores = [r["score"] for r in rec["retrieved"]]
        assert len(ids) == K and len(set(ids)) == K and set(ids) <= run["corpus"]
        assert scores == sorted(scores, reverse=True)
    return recs


# ------------------------------------------------------------------------------ the CLI
def test_eval_reloads_the_run_and_says_what_it_loaded(run, capsys):
    out = run["out"]
    loaded, m = eval_cli(capsys, "--output-dir", out, "--progress", "false")
    assert loaded == (
        f"eval: loaded {os.path.join(out, 'config.json')} and checkpoint "
        f"{os.path.join(out, 'checkpoint.pt')} (step 2): generator tiny-random, retriever "
        f"tiny-random, K={K}, mode sequence, decoding marginal"
    )
    with open(os.path.join(out, "metrics.json")) as fh:
        saved = json.load(fh)
    # the run's own evaluation, reproduced: same models, K, decoding, data
    assert m == saved["final"]
    assert saved["eval"]["step"] == 2 and saved["eval"]["decoding"] == "marginal"
    check_predictions(run, len(run["questions"]))


@pytest.mark.parametrize("decoding", ["top1", "marginal"])
def test_both_decodings_write_one_prediction_per_question(run, capsys, decoding):
    loaded, m = eval_cli(
        capsys,
        "--output-dir",
        run["out"],
        "--eval-decoding",
        decoding,
        "--eval-limit",
        "4",
        "--max-new-tokens",
        "2",
        "--progress",
        "false",
    )
    assert f"K={K}, mode sequence, decoding {decoding}" in loaded  # K still the run's
    assert m["n"] == 4
    check_predictions(run, 4)


def test_token_mode_run_decodes_rag_token(run, tmp_path, capsys):
    """--mode comes from the run: a run saved with --mode token decodes RAG-Token."""
    out = tmp_path / "token-run"
    shutil.copytree(run["out"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["mode"] = "token"
    (out / "config.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "elsewhere.pt"  # --checkpoint PATH: a checkpoint outside the run
    os.replace(out / "checkpoint.pt", ckpt)
    outside = tmp_path / "outside.txt"  # a symlink planted at predictions.jsonl
    outside.write_text("keep me")
    if os.path.lexists(out / "predictions.jsonl"):
        os.remove(out / "predictions.jsonl")
    os.symlink(outside, out / "predictions.jsonl")
    loaded, m = eval_cli(
        capsys, "--output-dir", str(out), "--checkpoint", str(ckpt), "--eval-limit", "3"
    )
    assert f"checkpoint {ckpt} (step 2)" in loaded
    assert "mode token, decoding marginal" in loaded and m["n"] == 3
    assert outside.read_text() == "keep me" and not os.path.islink(out / "predictions.jsonl")
    check_predictions({**run, "out": str(out)}, 3)


@pytest.fixture
def no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(loop_module, "load_generator", boom)
    monkeypatch.setattr(loop_module, "load_retriever", boom)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--steps", "5", "--lr-generator", "1"], ["--steps", "--lr-generator"]),
        (TINY, ["--generator", "--retriever"]),
        (["--docs=8", "--mode", "token"], ["--docs", "--mode"]),
        (["--seed", "1", "--data-seed", "2"], ["--seed", "--data-seed"]),
        (["--config", "c.toml"], ["--config"]),
    ],
)
def test_training_options_are_a_usage_error(run, capsys, no_models, argv, named):
    assert main(["eval", "--output-dir", run["out"], *argv]) == 2
    line = one_error_line(capsys)
    assert "eval does not take training options: " + ", ".join(named) in line, line


def test_unknown_and_bad_eval_options(run, capsys, no_models):
    assert main(["eval", "--output-dir", run["out"], "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in one_error_line(capsys)
    assert main(["eval", "--output-dir", run["out"], "--eval-decoding", "beam"]) == 2
    assert "--eval-decoding" in one_error_line(capsys)
    assert main(["eval", "--output-dir", run["out"], "--eval-limit", "-1"]) == 2
    assert "--eval-limit -1: must be >= 0" in one_error_line(capsys)


def test_missing_checkpoint_or_run_is_an_error(tmp_path, capsys, no_models):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--resume", "--output-dir", str(empty)]) == 2
    assert f"no checkpoint {empty / 'checkpoint.pt'}" in one_error_line(capsys)
    missing = tmp_path / "elsewhere.pt"
    assert main(["eval", "--checkpoint", str(missing), "--output-dir", str(empty)]) == 2
    assert f"--checkpoint: no checkpoint {missing}" in one_error_line(capsys)
    assert main(["eval", "--output-dir", str(empty)]) == 2
    line = one_error_line(capsys)
    assert str(empty / "config.json") in line and str(empty / "checkpoint.pt") in line
    assert main(["eval", "--output-dir", str(tmp_path / "nope")]) == 2
    assert "no such directory" in one_error_line(capsys)
    assert not (tmp_path / "nope").exists()
    assert sorted(os.listdir(empty)) == []  # nothing written


def test_config_json_problems_name_the_file(run, tmp_path, capsys, no_models):
    out = tmp_path / "bad-run"
    out.mkdir()
    (out / "config.json").write_text('{"docs": 0}')
    assert main(["eval", "--output-dir", str(out)]) == 2
    assert f"{out / 'config.json'}: docs: must be >= 1" in one_error_line(capsys)
    (out / "config.json").write_text('{"stepz": 1}')
    assert main(["eval", "--output-dir", str(out)]) == 2
    assert "unknown option 'stepz'" in one_error_line(capsys)
    (out / "config.json").write_text("{")
    assert main(["eval", "--output-dir", str(out)]) == 2
    assert "not valid JSON" in one_error_line(capsys)


# ------------------------------------------------------------------------------ decoding
V = 23
EOS = 5


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # peaked distributions: no near-ties in argmax
        pad_token_id=0,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(cfg).double().eval()


def _prompts(G, Kd, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (G, Kd), generator=g)
    prompts = [
        [torch.randint(6, V, (int(n),), generator=g).tolist() for n in row] for row in lengths
    ]
    prior = torch.log_softmax(2 * torch.randn(G, Kd, generator=g, dtype=torch.float64), -1)
    return prompts, prior


def _logp(lm, seq):
    with torch.no_grad():
        return torch.log_softmax(lm(input_ids=torch.tensor([seq])).logits[0], -1)


def _brute_token(lm, prompts, prior, n):
    """Greedy decoding on sum_k p(k|x) p(y_t|x,z_k,y_<t), one unpadded forward per doc."""
    y = []
    for _ in range(n):
        marg = torch.logsumexp(
            torch.stack([prior[k] + _logp(lm, p + y)[-1] for k, p in enumerate(prompts)]), 0
        )
        t = int(marg.argmax())
        if t == EOS:
            return y, True
        y.append(t)
    return y, False


def _brute_score(lm, prompt, y):
    lp = _logp(lm, prompt + y)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(y))


def test_rag_token_matches_brute_force(lm):
    prompts, prior = _prompts(4, 3)
    got = rag_token_decode(lm, prompts, prior, max_new_tokens=6, eos_token_id=EOS)
    assert got == [_brute_token(lm, p, prior[g], 6)[0] for g, p in enumerate(prompts)]


def test_rag_token_special_cases(lm):
    prompts, prior = _prompts(3, 3, seed=2)
    # K = 1 with a zero prior is plain greedy decoding (HF generate)
    for p in (row[0] for row in prompts):
        got = rag_token_decode(
            lm, [[p]], torch.zeros(1, 1), max_new_tokens=5, eos_token_id=EOS, keep_eos=True
        )[0]
        ref = lm.generate(
            torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=0
        )[0, len(p) :].tolist()
        assert got == ref[: len(got)] and (len(got) == 5 or got[-1] == EOS)
    # all the prior mass on document j: greedy decoding from document j alone
    one_hot = torch.full((3, 3), -1e4, dtype=torch.float64)
    one_hot[:, 1] = 0
    got = rag_token_decode(lm, prompts, one_hot, max_new_tokens=6, eos_token_id=EOS)
    alone = rag_token_decode(
        lm, [[p[1]] for p in prompts], torch.zeros(3, 1), max_new_tokens=6, eos_token_id=EOS
    )
    assert got == alone


def test_rag_sequence_picks_the_best_marginal_candidate(lm):
    prompts, prior = _prompts(4, 3, seed=3)
    choices = rag_sequence_decode(lm, prompts, prior, max_new_tokens=6, eos_token_id=EOS)
    for g, (ch, ps) in enumerate(zip(choices, prompts, strict=True)):
        # the candidates: one greedy decoding per document (with its EOS), duplicates merged
        greedy = []
        for p in ps:
            y, ended = _brute_token(lm, [p], torch.zeros(1), 6)
            y = y + [EOS] if ended else y
            if y not in greedy:
                greedy.append(y)
        assert ch.candidates == greedy
        # every candidate rescored under every document
        brute = torch.tensor(
            [[_brute_score(lm, p, y) for p in ps] for y in greedy], dtype=torch.float64
        )
        torch.testing.assert_close(ch.scores, brute, rtol=1e-9, atol=1e-9)
        marg = torch.logsumexp(prior[g][None] + brute, -1)
        torch.testing.assert_close(ch.log_marginal, marg, rtol=1e-9, atol=1e-9)
        assert ch.best == int(marg.argmax()) and float(marg[ch.best]) == pytest.approx(
            float(marg.max())
        )
        best = greedy[ch.best]
        assert ch.answer == (best[:-1] if best[-1] == EOS else best)


def test_score_candidates_chunking_is_exact(lm):
    prompts, _ = _prompts(2, 3, seed=4)
    cands = [[[7, 8, EOS], [9]], [[10, 11, 12, 13]]]
    a = score_candidates(lm, prompts, cands, chunk_rows=64)
    b = score_candidates(lm, prompts, cands, chunk_rows=2)
    for x, y, ps, cs in zip(a, b, prompts, cands, strict=True):
        torch.testing.assert_close(x, y)
        ref = torch.tensor([[_brute_score(lm, p, c) for p in ps] for c in cs], dtype=torch.float64)
        torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)


def test_relative_data_paths_are_saved_absolute(run, tmp_path, monkeypatch, capsys):
    """Data paths given relative to the working directory are saved absolute (config.json),
    so ``eval`` of the run works from any other directory."""
    data_dir, elsewhere, out = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "run"
    data_dir.mkdir()
    elsewhere.mkdir()
    for k, path in run["data"].items():
        shutil.copy(path, data_dir / f"{k}.jsonl")
    monkeypatch.chdir(data_dir)
    args = ["train", *TINY, "--steps", "1", "--batch-size", "2", "--docs", str(K)]
    args += ["--max-new-tokens", "2", "--eval-limit", "2", "--skip-initial-eval"]
    args += ["--progress", "false", "--output-dir", str(out)]
    args += [x for k in run["data"] for x in (f"--{k}", f"{k}.jsonl")]
    assert main(args) == 0
    with open(out / "config.json") as fh:
        saved = json.load(fh)
    for k in run["data"]:
        assert saved[k] == str(data_dir / f"{k}.jsonl"), (k, saved[k])
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    loaded, m = eval_cli(capsys, "--output-dir", str(out), "--progress", "false")
    assert "step 1" in loaded and m


def test_eval_under_torchrun(run, tmp_path):
    """``rag-kernels eval`` on 2 processes: only rank 0 writes, so only rank 0 locks the run
    (every rank took the lock, and rank 1 failed on rank 0's); the metrics are the run's."""
    import subprocess
    import sys

    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "rag_kernels", "eval", "--output-dir", str(out), "--progress", "false"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "metrics.json") as fh:
        saved = json.load(fh)
    assert saved["eval"]["step"] == 2
    assert {k: v for k, v in saved["eval"].items() if k in saved["final"]} == saved["final"]
    assert len(read_predictions(str(out / "predictions.jsonl"))) == len(run["questions"])
