"""FSDP2 (``fully_shard``) generators, gloo on CPU, in spawned processes.

* the library pattern (``rk.hf.fsdp_rag_loss_method``: the loss inside a method FSDP unshards
  the root for): two AdamW steps of a tiny random Llama on 2 ranks give the losses, the
  clipped gradient norms and the parameters of one process on the same global batch;
* a DTensor weight passed to the fused ops outside such a method is a TypeError naming it;
* the training loop with ``--fsdp`` on 2 ranks trains like one process on the global batch,
  and its checkpoint (full tensors) resumes into freshly sharded models exactly;
* ``torchrun --nproc_per_node=2 -m rag_kernels train --fsdp`` runs to the end, and
  ``rag-kernels eval`` reads its checkpoint in one process without FSDP.

Tolerance: fp32 throughout; the sharded run sums the gradients in another order (a
reduce-scatter of per-rank gradients instead of one backward over the global batch), so
losses and parameters agree to fp32 rounding, checked at rtol 1e-5 / atol 1e-6 (parameters
of size ~0.02 moved by lr = 1e-2 per step; the differences seen are ~2e-7). The loop's
comparison uses the tolerance of the replicated 2-process test in tests/test_training.py
(its retrieval scores and embeddings come from batches of other sizes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import rag_kernels as rk
from toolkit import tiny_dataset, tiny_train_config

pytest.importorskip("faiss")

WORLD = 2
V_SIZE = 61  # odd: FSDP's shards of the head are 31 and 30 rows
B_LOCAL, K, L = 2, 2, 9
STEPS = (  # (mode, label_smoothing) of each of the two steps
    ("sequence", 0.0),
    ("token", 0.1),
)
LR, MAX_NORM = 1e-2, 0.5
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).float()


def _batch(rank: int, step: int):
    """Rank ``rank``'s RagBatch of step ``step``: B_LOCAL queries x K documents, left-padded
    prompts of different lengths, the query's answer at the end of each of its K rows."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.zeros(B_LOCAL * K, L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full((B_LOCAL, L - 1), -100, dtype=torch.long)
    for b in range(B_LOCAL):
        answer = torch.randint(1, V_SIZE, (2 + b,), generator=g)
        target[b, L - 1 - len(answer) :] = answer
        for k in range(K):
            n = L - len(answer) - int(torch.randint(0, 3, (1,), generator=g))
            row = torch.cat([torch.randint(1, V_SIZE, (n,), generator=g), answer])
            ids[b * K + k, L - len(row) :] = row
            mask[b * K + k, L - len(row) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    scores = torch.randn(B_LOCAL, K, generator=g)
    return rk.hf.RagBatch(ids, mask, pos, target, K), scores


def _global_batch(step: int):
    parts = [_batch(r, step) for r in range(WORLD)]
    b = parts[0][0]
    cat = {f: torch.cat([getattr(p[0], f) for p in parts]) for f in
           ("input_ids", "attention_mask", "position_ids", "target")}  # fmt: skip
    return rk.hf.RagBatch(**cat, n_docs=b.n_docs), torch.cat([p[1] for p in parts])


def _train(model, loss_fn, batches):
    """Two AdamW steps; per step (loss, gradient norm before clipping)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    out = []
    for (batch, scores), (mode, eps) in zip(batches, STEPS, strict=True):
        loss = loss_fn(batch, scores, mode=mode, label_smoothing=eps)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.detach().clone(), norm.detach().clone()))
    return out


def _errors(model, batch, scores) -> dict:
    """What the fused ops say when handed the sharded head outside the registered method."""
    errs = {}
    w = model.lm_head.weight
    hidden = torch.randn(B_LOCAL, K, L - 1, 16)
    calls = {
        "rag_loss": lambda: rk.rag_loss(hidden, w, batch.target, scores),
        "linear_logprob": lambda: rk.linear_logprob(hidden, w, batch.target[:, None, :]),
        "bias": lambda: rk.linear_logprob(
            hidden, torch.randn(V_SIZE, 16), batch.target[:, None, :], bias=w[:, 0]
        ),
        "causal_rag_loss": lambda: rk.hf.causal_rag_loss(model, batch, scores),
    }
    for name, call in calls.items():
        try:
            call()
            errs[name] = None
        except (TypeError, ValueError) as e:
            errs[name] = (type(e).__name__, str(e))
    return errs


def _loop_config(out_dir: str, **kw):
    """tiny_train_config's run for 2 steps, without the initial evaluation, decoding with
    TrainConfig's own settings."""
    base = dict(steps=2, skip_initial_eval=True, max_new_tokens=12, eval_batch_size=16)
    return tiny_train_config(out_dir, **(base | kw))


def _s2s_config(out_dir: str, bart_dir: str, **kw):
    return _loop_config(
        out_dir, generator=bart_dir, steps=1, max_new_tokens=3, eval_batch_size=2, **kw
    )


def _loop(rank: int, out_dir: str, bart_dir: str) -> dict:
    """The co-training loop with --fsdp: two steps, a checkpoint, its resume into freshly
    sharded models (state re-gathered, one more step on both); a step and an evaluation of
    an encoder-decoder generator (BART: its decoding calls the encoder directly)."""
    from rag_kernels.cotrain.training import CoTrainer
    from rag_kernels.integrations import fsdp

    cfg = _loop_config(os.path.join(out_dir, "loop"), fsdp=True)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    assert fsdp.is_sharded(tr.generator) and fsdp.is_sharded(tr.retriever.query_model)
    tr.refresh_index()
    res = {"logs": [tr.train_step() for _ in range(2)]}
    tr.save_checkpoint()  # collective; rank 0 writes
    torch.distributed.barrier()  # the file is complete before any rank reads it
    tr2 = CoTrainer(dataclasses.replace(cfg, resume=True), dataset=tiny_dataset())
    tr2.load_checkpoint()
    res["reloaded"] = copy.deepcopy(tr2.state_dict())  # gathered again from the new shards
    res["step3"] = (tr.train_step(), tr2.train_step())
    tr = CoTrainer(_s2s_config(os.path.join(out_dir, "s2s"), bart_dir, fsdp=True), tiny_dataset())
    tr.refresh_index()
    res["s2s"] = (tr.train_step(), tr.evaluate(tiny_dataset().test))
    return res


def _worker(rank, port, out_dir, bart_dir):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from rag_kernels.integrations import fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = fsdp.fully_shard_model(_model())
        loss_fn = rk.hf.fsdp_rag_loss_method(model)
        res = {
            "placements": str(model.lm_head.weight.placements),
            "local_rows": model.lm_head.weight.to_local().shape[0],
            "errors": _errors(model, *_batch(rank, 0)),
        }
        res["steps"] = _train(model, loss_fn, [_batch(rank, s) for s in range(len(STEPS))])

        # the general pattern: rk.generator_feedback on the unsharded head, no gradient
        # (after the two steps)
        def feedback(m, batch):
            head = rk.hf.lm_head(m)
            return rk.generator_feedback(rk.hf.rag_hidden(m, batch), head.weight, batch.target)

        with torch.no_grad():
            fb = fsdp.forward_method(model, feedback, name="feedback")(_batch(rank, 0)[0])
        res["feedback"] = fb.sum_logprob.clone()
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            res["params"] = {k: v.clone() for k, v in full.items()}
        res["loop"] = _loop(rank, out_dir, bart_dir)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    from test_seq2seq_train import save_generator  # a 2+2-layer random BART + its tokenizer

    return save_generator(tmp_path_factory.mktemp("bart") / "bart", "bart")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, bart_dir):
    out = str(tmp_path_factory.mktemp("fsdp"))
    mp.start_processes(
        _worker, args=(_free_port(), out, bart_dir), nprocs=WORLD, join=True, start_method="spawn"
    )
    return out, [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(spawned):
    return spawned[1]


@pytest.fixture(scope="module")
def single():
    """One process, no FSDP, the global batch (both ranks' queries) of each step."""
    model = _model()
    loss_fn = rk.hf.fsdp_rag_loss_method(model)  # an unsharded model: the plain loss
    steps = _train(model, loss_fn, [_global_batch(s) for s in range(len(STEPS))])
    with torch.no_grad():  # each rank's batch on the trained model, as the ranks do
        fb = [
            rk.generator_feedback(
                rk.hf.rag_hidden(model, _batch(r, 0)[0]),
                model.lm_head.weight,
                _batch(r, 0)[0].target,
            ).sum_logprob
            for r in range(WORLD)
        ]
    return steps, {k: v.detach() for k, v in model.state_dict().items()}, fb


def test_head_is_sharded_by_rows(ranks):
    assert [r["local_rows"] for r in ranks] == [31, 30]
    assert ranks[0]["placements"] == "(Shard(dim=0),)"


def test_two_fsdp_steps_match_one_process(ranks, single):
    """Mean of the ranks' losses == the global-batch loss; the clipped gradient norm and the
    parameters after two AdamW steps (gathered full state) == one process's."""
    steps, params, _ = single
    for i, (loss, norm) in enumerate(steps):
        got = torch.stack([r["steps"][i][0] for r in ranks]).mean()
        torch.testing.assert_close(got, loss, rtol=RTOL, atol=ATOL)
        for r in ranks:
            torch.testing.assert_close(r["steps"][i][1], norm, rtol=RTOL, atol=ATOL)
        assert float(norm) > MAX_NORM  # the clipping was active
    got = ranks[0]["params"]
    assert set(got) == set(params)
    for k, v in params.items():
        torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL, msg=k)
    # and training moved them (the comparison is not of the initial weights)
    assert not torch.allclose(params["lm_head.weight"], _model().lm_head.weight)


def test_forward_method_feedback_matches_one_process(ranks, single):
    _, _, fb = single
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["feedback"], fb[r], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("call", ["rag_loss", "linear_logprob", "bias"])
def test_dtensor_weight_is_refused(ranks, call):
    for r in ranks:
        kind, msg = r["errors"][call]
        arg = "bias" if call == "bias" else "weight"
        assert kind == "TypeError"
        assert msg.startswith(f"{arg} must be a plain torch.Tensor, got a DTensor"), msg
        assert "fsdp_rag_loss_method" in msg and "Shard(dim=0)" in msg


def test_hf_loss_outside_the_method_is_refused(ranks):
    for r in ranks:
        kind, msg = r["errors"]["causal_rag_loss"]
        assert kind == "ValueError" and "rk.hf.rag_hidden" in msg
        assert "fsdp_rag_loss_method" in msg


def test_not_sharded_helpers_are_no_ops():
    from rag_kernels.integrations import fsdp

    model = _model()
    assert not fsdp.is_sharded(model)
    with torch.no_grad(), fsdp.unsharded(model) as m:
        assert m is model
    f = fsdp.forward_method(model, lambda m, x: x + 1, name="plus_one")
    assert f(1) == 2 and model.plus_one(2) == 3
    with pytest.raises(ValueError, match="already has an attribute 'forward'"):
        fsdp.forward_method(model, lambda m: None, name="forward")
    with pytest.raises(ValueError, match="no submodule of LlamaForCausalLM is a"):
        fsdp.fully_shard_model(model, layer_classes="NoSuchLayer")


# ------------------------------------------------------------------ the training loop


def test_loop_fsdp_matches_one_process(spawned, tmp_path):
    """2 ranks with --fsdp == one process on the global batch (as the replicated 2-process
    test of tests/test_training.py), checkpoint weights compared."""
    from rag_kernels.cotrain.training import CoTrainer

    out, res = spawned
    got = torch.load(os.path.join(out, "loop", "checkpoint.pt"), weights_only=True)
    tr = CoTrainer(_loop_config(str(tmp_path / "single"), batch_size=4), dataset=tiny_dataset())
    tr.refresh_index()
    logs = [tr.train_step() for _ in range(2)]
    want = tr.state_dict()
    for name in ("generator", "retriever"):
        assert set(got[name]) == set(want[name]) and got[name]
        for k, v in want[name].items():
            torch.testing.assert_close(got[name][k], v, rtol=1e-3, atol=2e-5, msg=f"{name} {k}")
    for i in range(2):  # every rank logs the loss of the global batch (the ranks' mean)
        for r in res:
            assert r["loop"]["logs"][i]["loss"] == pytest.approx(logs[i]["loss"], rel=1e-4)
        norm = res[0]["loop"]["logs"][i]["grad_norm_generator"]
        assert norm == pytest.approx(logs[i]["grad_norm_generator"], rel=1e-4)


def test_loop_fsdp_checkpoint_resumes_exactly(spawned):
    """The full-tensor checkpoint, loaded into freshly sharded models and gathered again, is
    the checkpoint (weights and AdamW moments, bit for bit); the next step is the same."""
    out, res = spawned
    saved = torch.load(os.path.join(out, "loop", "checkpoint.pt"), weights_only=True)
    again = res[0]["loop"]["reloaded"]
    for name in ("generator", "retriever"):
        assert set(again[name]) == set(saved[name])
        for k, v in saved[name].items():
            assert torch.equal(again[name][k], v), (name, k)
    assert again["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    assert set(again["optimizer"]["state"]) == set(saved["optimizer"]["state"])
    for i, st in saved["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(again["optimizer"]["state"][i][k], v), (i, k)
    assert (again["step"], again["cursor"]) == (saved["step"], saved["cursor"])
    for r in res:
        a, b = r["loop"]["step3"]
        assert {k: v for k, v in a.items() if k not in ("seconds", "questions_per_s")} == {
            k: v for k, v in b.items() if k not in ("seconds", "questions_per_s")
        }


def test_loop_fsdp_encoder_decoder_matches_one_process(spawned, bart_dir, tmp_path):
    """BART under --fsdp: a step (the loss, the feedback, the gradient norm) and the
    evaluation (decoding runs the encoder and decoder outside the root's forward, the root
    gathered for it) as one process on the global batch."""
    from rag_kernels.cotrain.training import CoTrainer

    _, res = spawned
    tr = CoTrainer(_s2s_config(str(tmp_path / "s2s"), bart_dir, batch_size=4), tiny_dataset())
    tr.refresh_index()
    logs, metrics = tr.train_step(), tr.evaluate(tiny_dataset().test)
    for r in res:  # every rank logs the loss of the global batch
        assert r["loop"]["s2s"][0]["loss"] == pytest.approx(logs["loss"], rel=1e-4)
    for key in ("grad_norm_generator", "grad_norm_retriever"):
        assert res[0]["loop"]["s2s"][0][key] == pytest.approx(logs[key], rel=1e-4)
    for r in res:
        assert r["loop"]["s2s"][1] == pytest.approx(metrics)


# ------------------------------------------------------------------ the CLI under torchrun


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``torchrun --nproc_per_node=2 -m rag_kernels train --fsdp`` on files of the tiny data
    set, with the default --generator-train-layers (the root unit's embedding frozen, its
    final norm trained) and the initial and final evaluations."""
    from rag_kernels.cotrain.data import write_corpus, write_qa

    d = tmp_path_factory.mktemp("fsdp_cli")
    ds = tiny_dataset()
    data = {k: str(d / f"{k}.jsonl") for k in ("corpus", "train", "eval")}
    write_corpus(data["corpus"], ds.corpus)
    write_qa(data["train"], ds.train)
    write_qa(data["eval"], ds.test)
    out = str(d / "run")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", "-m", "rag_kernels", "train", "--fsdp",
        "--generator", "tiny-random", "--retriever", "tiny-random", "--steps", "2",
        "--batch-size", "2", "--docs", "3", "--max-new-tokens", "3", "--eval-batch-size", "4",
        "--lr-generator", "1e-3", "--progress", "false", "--output-dir", out,
        *[x for k, v in data.items() for x in (f"--{k}", v)],
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return {"proc": proc, "out": out, "data": data}


def test_torchrun_fsdp_train_runs_to_the_end(cli_run):
    proc, out = cli_run["proc"], cli_run["out"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(out, "metrics.json")) as fh:
        m = json.load(fh)
    assert m["initial"]["n"] == m["final"]["n"] == len(tiny_dataset().test)
    with open(os.path.join(out, "train_log.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2]
    st = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert st["step"] == 2 and st["config"]["fsdp"] is True
    assert st["data"]["world_size"] == WORLD
    # full tensors: the top layers and the final norm, not the frozen tied embedding
    assert "model.norm.weight" in st["generator"]
    assert "model.embed_tokens.weight" not in st["generator"]
    assert st["generator"]["model.norm.weight"].shape == (32,)


def test_fsdp_checkpoint_evaluates_in_one_process(cli_run, tmp_path, capsys):
    """``rag-kernels eval`` in one process (no FSDP) loads the --fsdp checkpoint whole
    (weights, optimizer, scheduler) and reproduces the run's final metrics."""
    from rag_kernels.cotrain.cli import main

    assert cli_run["proc"].returncode == 0
    out = str(tmp_path / "copy")
    shutil.copytree(cli_run["out"], out)
    assert main(["eval", "--output-dir", out, "--progress", "false"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(os.path.join(out, "metrics.json")) as fh:
        final = json.load(fh)["final"]
    assert printed == pytest.approx(final)


def test_fsdp_checkpoint_resume_rules(cli_run, tmp_path, capsys):
    """--fsdp may change freely on resume (RESUME_FREE); one process cannot resume a
    2-process run at all (the number of processes is refused, --fsdp or not)."""
    from rag_kernels.cotrain.training.config import RESUME_FREE, resume_differences
    from toolkit import cli_error_line

    assert "fsdp" in RESUME_FREE
    old, new = {"fsdp": True}, {"fsdp": False}
    assert resume_differences(old, new, {}, {}) == ([], [])
    assert resume_differences({}, {"fsdp": True}, {}, {}) == ([], [])  # older checkpoints
    assert cli_run["proc"].returncode == 0
    out = str(tmp_path / "copy")
    shutil.copytree(cli_run["out"], out)
    args = ["train", "--generator", "tiny-random", "--retriever", "tiny-random", "--steps", "3",
            "--batch-size", "2", "--docs", "3", "--lr-generator", "1e-3", "--progress", "false",
            "--output-dir", out, "--resume", "--resume-force",
            *[x for k, v in cli_run["data"].items() for x in (f"--{k}", v)]]  # fmt: skip
    line = cli_error_line(capsys, *args)
    assert "number of processes (torchrun) 2 → 1" in line and "--fsdp" not in line


def test_fsdp_in_one_process_is_an_error(tmp_path, capsys):
    from toolkit import cli_error_line

    line = cli_error_line(
        capsys, "train", "--fsdp", "--generator", "tiny-random", "--retriever", "tiny-random",
        "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert "--fsdp shards the models over the processes of a torchrun launch" in line
