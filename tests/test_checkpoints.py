"""Checkpoints and runs of the co-training app (tiny random models):

* loading never unpickles code (``weights_only=True``; a crafted ``__reduce__`` is refused
  and does not run);
* integrity: a SHA-256 over every byte; flipped, truncated, empty, random and foreign files
  are refused with one error naming the file;
* resuming with a changed configuration or changed data is refused (``--resume-force``
  accepts only the documented safe options);
* exact resume after Ctrl-C (handler, second Ctrl-C, KeyboardInterrupt inside a step) and
  after a crash ("kill -9") with extra and torn log lines: the same per-step losses as an
  uninterrupted run, every step logged once;
* the output directory: locked during a run; planted symlinks are replaced, never followed.
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from rag_kernels.cotrain.cli import main
from rag_kernels.cotrain.data import write_corpus, write_qa
from rag_kernels.cotrain.errors import UserError
from rag_kernels.cotrain.training import CoTrainer, TrainConfig, loop
from rag_kernels.cotrain.training import checkpoint as ck
from rag_kernels.cotrain.training.config import RESUME_FORCE_SAFE
from rag_kernels.cotrain.training.files import RunLock, atomic_write
from rag_kernels.cotrain.training.loop import plot_curves
from toolkit import tiny_dataset, tiny_train_config

pytest.importorskip("faiss")


# ------------------------------------------------------------------------------ helpers
def config(out, **kw) -> TrainConfig:
    return tiny_train_config(out, **(dict(skip_initial_eval=True) | kw))


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def ckpt_path(out) -> str:
    return os.path.join(str(out), "checkpoint.pt")


def write_data(d) -> dict:
    """The tiny data set as JSONL files; returns the cfg kwargs naming them."""
    os.makedirs(d, exist_ok=True)
    ds = tiny_dataset()
    write_corpus(os.path.join(d, "corpus.jsonl"), ds.corpus)
    write_qa(os.path.join(d, "train.jsonl"), ds.train)
    write_qa(os.path.join(d, "test.jsonl"), ds.test)
    return {
        "corpus": os.path.join(d, "corpus.jsonl"),
        "train": os.path.join(d, "train.jsonl"),
        "eval": os.path.join(d, "test.jsonl"),
    }


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rag-kernels: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A real 2-step checkpoint of a run on the tiny data set written as files."""
    root = tmp_path_factory.mktemp("good")
    data = write_data(root / "data")
    cfg = config(root / "run", steps=2, **data)
    CoTrainer(cfg).fit()
    return {"path": ckpt_path(cfg.output_dir), "data": data, "cfg": cfg}


def fresh_run_dir(tmp_path, good_checkpoint, name="run") -> str:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(good_checkpoint["path"], out / "checkpoint.pt")
    return str(out)


# ------------------------------------------------------------------------------ 1. no code
class Evil:
    """Unpickling this runs a shell command (creates ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_evil_pickle_would_run_code(tmp_path):
    """Sanity check of the test: a plain unpickle of Evil does run its command."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


def _evil_files(marker):
    def raw_pickle(path):
        with open(path, "wb") as fh:
            pickle.dump({"step": Evil(marker)}, fh)

    def torch_file(path):
        torch.save({"step": 1, "cursor": 2, "payload": Evil(marker)}, path)

    def forged_trailer(path):  # our format and a VALID checksum around a malicious pickle
        import io

        buf = io.BytesIO()
        torch.save(
            {
                "format": ck.FORMAT,
                "version": ck.VERSION,
                "step": 0,
                "cursor": 0,
                "rng": Evil(marker),
            },
            buf,
        )
        with open(path, "wb") as fh:
            fh.write(ck._with_trailer(buf.getvalue()))

    return {"raw-pickle": raw_pickle, "torch-save": torch_file, "forged-trailer": forged_trailer}


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save", "forged-trailer"])
def test_malicious_checkpoint_is_refused_and_does_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    _evil_files(marker)[kind](ckpt_path(out))
    with pytest.raises(UserError, match="checkpoint.pt") as info:
        CoTrainer(config(out, resume=True), dataset=tiny_dataset())
    assert "\n" not in str(info.value)
    assert not marker.exists()
    with pytest.raises(UserError):
        ck.read_checkpoint(ckpt_path(out))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_malicious_checkpoint_cli_one_line(tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    _evil_files(marker)["forged-trailer"](ckpt_path(out))
    argv = [command, "--resume", "--output-dir", str(out), "--progress", "false"]
    if command == "train":  # eval takes the models and data from the run (the checkpoint)
        argv += [*("--generator", "tiny-random", "--retriever", "tiny-random")]
        argv += ["--corpus", data["corpus"], "--train", data["train"], "--eval", data["eval"]]
    rc = main(argv)
    assert rc == 2
    line = one_error_line(capsys)
    assert ckpt_path(out) in line and "refused" in line
    assert not marker.exists()


def _plain(obj, where="state"):
    """Assert the checkpoint holds tensors and plain data only."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), (where, k)
            _plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _plain(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)), (
            where,
            type(obj),
        )


def test_checkpoint_is_plain_data_loadable_with_weights_only(good_checkpoint):
    st = torch.load(good_checkpoint["path"], weights_only=True)
    _plain(st)
    assert st["format"] == ck.FORMAT and st["version"] == ck.VERSION
    assert st["config"] == good_checkpoint["cfg"].to_dict()
    assert set(st["data"]) == {"corpus", "train", "dev", "eval", "world_size"}
    assert isinstance(st["rng"]["python"]["state"], torch.Tensor)
    assert isinstance(st["rng"]["numpy"]["keys"], torch.Tensor)
    assert (st["step"], st["cursor"]) == (2, 4)


def test_rng_state_round_trip():
    st = ck.get_rng_state()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    ck.set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


# ------------------------------------------------------------------------------ 2. integrity
def _damage(kind, path, tmp_path):
    raw = open(path, "rb").read()
    rng = random.Random(0)
    if kind == "flip64":
        b = bytearray(raw)
        for i in rng.sample(range(len(b)), 64):
            b[i] ^= 0xFF
        raw = bytes(b)
    elif kind == "flip64-middle":  # 64 consecutive bytes inside the tensor data
        b = bytearray(raw)
        mid = len(b) // 2
        for i in range(mid, mid + 64):
            b[i] ^= 0x5A
        raw = bytes(b)
    elif kind == "flip1-trailer":
        b = bytearray(raw)
        b[-1] ^= 0x01
        raw = bytes(b)
    elif kind == "truncated-half":
        raw = raw[: len(raw) // 2]
    elif kind == "truncated-1":
        raw = raw[:-1]
    elif kind == "empty":
        raw = b""
    elif kind == "random":
        raw = os.urandom(4096)
    elif kind == "foreign-torch":
        torch.save({"model": torch.zeros(3), "step": 1, "cursor": 2}, path)
        return
    elif kind == "foreign-tensor":
        torch.save(torch.arange(10), path)
        return
    elif kind == "json":
        raw = b'{"step": 1}'
    with open(path, "wb") as fh:
        fh.write(raw)


DAMAGE = [
    "flip64",
    "flip64-middle",
    "flip1-trailer",
    "truncated-half",
    "truncated-1",
    "empty",
    "random",
    "foreign-torch",
    "foreign-tensor",
    "json",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_or_foreign_checkpoint_is_refused(tmp_path, good_checkpoint, kind):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    _damage(kind, ckpt_path(out), tmp_path)
    with pytest.raises(UserError) as info:
        ck.read_checkpoint(ckpt_path(out))
    msg = str(info.value)
    assert msg.startswith(ckpt_path(out) + ":") and "\n" not in msg


@pytest.mark.parametrize("kind", ["flip64", "truncated-half", "empty", "random", "foreign-torch"])
def test_damaged_checkpoint_cli_one_line_no_traceback(tmp_path, capsys, good_checkpoint, kind):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    _damage(kind, ckpt_path(out), tmp_path)
    d = good_checkpoint["data"]
    rc = main(
        [
            "train",
            "--resume",
            "--generator",
            "tiny-random",
            "--retriever",
            "tiny-random",
            "--output-dir",
            out,
            "--progress",
            "false",
            "--corpus",
            d["corpus"],
            "--train",
            d["train"],
            "--eval",
            d["eval"],
        ]
    )
    assert rc == 2
    assert ckpt_path(out) in one_error_line(capsys)


@pytest.mark.parametrize(
    "rng, error",
    [
        pytest.param({}, "KeyError", id="empty"),
        pytest.param("state", "TypeError", id="not-a-dict"),
        pytest.param("bad-torch", "RuntimeError", id="torch-state-3-bytes"),
    ],
)
def test_malformed_rng_state_is_refused_and_leaves_the_rng_alone(
    tmp_path, good_checkpoint, rng, error
):
    """A checkpoint (valid digest: it is unkeyed) whose RNG state the setters cannot take gave
    a traceback at resume / eval (KeyError, RuntimeError), after the models were loaded; it is
    now refused when read, and this process's RNG states are left as they were."""
    out = fresh_run_dir(tmp_path, good_checkpoint)
    st = ck.read_checkpoint(ckpt_path(out))
    if rng == "bad-torch":
        rng = dict(st["rng"], torch=torch.zeros(3, dtype=torch.uint8))
    ck.write_checkpoint(ckpt_path(out), dict(st, rng=rng))
    random.seed(1)
    torch.manual_seed(1)
    want = (random.random(), torch.rand(1))
    random.seed(1)
    torch.manual_seed(1)
    with pytest.raises(UserError, match=rf"corrupt checkpoint \(rng: {error}"):
        ck.read_checkpoint(ckpt_path(out))
    assert (random.random(), torch.rand(1)) == want


def test_a_directory_where_a_file_is_read_is_named(tmp_path):
    """read_bytes on a directory said "4: Is a directory" (os.fdopen names the descriptor)."""
    from rag_kernels.cotrain.training.files import read_bytes

    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(UserError, match=rf"^{tmp_path / 'checkpoint.pt'}: is a directory$"):
        read_bytes(str(tmp_path / "checkpoint.pt"))


def test_a_diverging_run_stops_before_its_checkpoint(tmp_path, capsys):
    """Learning rates far too high made the weights non-finite: the run checkpointed them and
    ended in a traceback from the retrieval index at the final evaluation. It now stops after
    the update that broke them, with one line, and writes no checkpoint of them."""
    run = tmp_path / "run"
    code = main(["train", "--generator", "tiny-random", "--retriever", "tiny-random",
                 "--output-dir", str(run), "--steps", "3", "--progress", "false",
                 "--skip-initial-eval", "--lr-generator", "1e30", "--lr-retriever", "1e30"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    # (the updates leave the weights finite but so large that a later step's query
    # embeddings overflow)
    assert re.search(r"step \d: training diverged: the query embeddings are non-finite", err), err
    assert not (run / "checkpoint.pt").exists()


def test_checksum_mismatch_is_named(tmp_path, good_checkpoint):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    _damage("flip64-middle", ckpt_path(out), tmp_path)
    with pytest.raises(UserError, match="checksum mismatch"):
        ck.read_checkpoint(ckpt_path(out))


def test_old_format_checkpoint_is_refused(tmp_path):
    """What the previous version wrote (numpy RNG state, no checksum) is not loaded."""
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"step": 1, "cursor": 2, "config": {}, "rng": {"numpy": np.random.get_state()}}, path
    )
    with pytest.raises(UserError, match="not a rag-kernels checkpoint"):
        ck.read_checkpoint(str(path))


# ------------------------------------------------------------------------------ 3. config
UNSAFE = [
    ("docs", 2, "--docs 3 → 2"),
    ("retriever_objective", "lsr", "--retriever-objective pdist → lsr"),
    ("mode", "token", "--mode sequence → token"),
    ("doc_encoder", "shared", "--doc-encoder frozen → shared"),
    ("seed", 1, "--seed 0 → 1"),
    ("data_seed", 3, "--data-seed 0 → 3"),
    ("generator_train_layers", 1, "--generator-train-layers -1 → 1"),
    ("lr_generator", 0.5, "--lr-generator 0.001 → 0.5"),
    ("batch_size", 3, "--batch-size 2 → 3"),
    ("label_smoothing", 0.1, "--label-smoothing 0.0 → 0.1"),
    ("freeze_retriever", True, "--freeze-retriever false → true"),
    ("balancing", "uncertainty", "--balancing fixed → uncertainty"),
    ("index", "ivf", "--index flat → ivf"),
]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("name, value, expect", UNSAFE, ids=[u[0] for u in UNSAFE])
def test_resume_with_unsafe_change_is_refused(
    tmp_path, good_checkpoint, name, value, expect, force
):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    cfg = config(out, resume=True, resume_force=force, **good_checkpoint["data"], **{name: value})
    with pytest.raises(UserError) as info:
        CoTrainer(cfg)
    assert expect in str(info.value) and ckpt_path(out) in str(info.value)


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, good_checkpoint):
    """--resume --steps 1 on a step-2 checkpoint trained nothing, exited 0 and wrote a
    config.json saying steps=1 next to the step-2 checkpoint."""
    out = fresh_run_dir(tmp_path, good_checkpoint)
    with pytest.raises(UserError, match=r"^--steps 1: .* is at step 2 already; pass --steps >= 2"):
        CoTrainer(config(out, resume=True, steps=1, **good_checkpoint["data"]))
    assert os.listdir(out) == ["checkpoint.pt"]


def test_resume_with_another_model_is_refused(tmp_path, good_checkpoint):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = fresh_run_dir(tmp_path, good_checkpoint)
    with pytest.raises(UserError, match=f"--generator tiny-random → {model}"):
        CoTrainer(
            config(
                out, resume=True, resume_force=True, generator=str(model), **good_checkpoint["data"]
            )
        )


@pytest.mark.parametrize("which", ["corpus", "train"])
@pytest.mark.parametrize("force", [False, True])
def test_resume_with_changed_data_is_refused(tmp_path, good_checkpoint, which, force):
    data = write_data(tmp_path / "data")
    path = data[which]
    lines = open(path).read().splitlines()
    row = json.loads(lines[0])
    row["text" if which == "corpus" else "question"] += " (edited)"
    lines[0] = json.dumps(row)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    out = fresh_run_dir(tmp_path, good_checkpoint)
    with pytest.raises(UserError, match=f"{which} data changed"):
        CoTrainer(config(out, resume=True, resume_force=force, **data))


def test_resume_with_moved_but_identical_data_is_accepted(tmp_path, good_checkpoint):
    data = write_data(tmp_path / "elsewhere")  # same content, other paths
    out = fresh_run_dir(tmp_path, good_checkpoint)
    tr = CoTrainer(config(out, resume=True, steps=4, **data))
    tr.fit()
    assert [r["step"] for r in read_log(out)] == [3, 4]


SAFE = [
    ("log_every", 2),
    ("checkpoint_every", 1),
    ("eval_limit", 1),
    ("max_new_tokens", 2),
    ("eval_decoding", "top1"),
    ("eval_batch_size", 1),
    ("skip_initial_eval", False),
    ("eval_every", 1),
    ("best_metric", "em"),
    ("gradient_checkpointing", True),
]


def test_safe_list_is_the_documented_one():
    assert {s[0] for s in SAFE} == set(RESUME_FORCE_SAFE)


@pytest.mark.parametrize("name, value", SAFE, ids=[s[0] for s in SAFE])
def test_safe_change_needs_resume_force(tmp_path, good_checkpoint, capsys, name, value):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    kw = dict(good_checkpoint["data"], **{name: value})
    with pytest.raises(UserError, match="--resume-force"):
        CoTrainer(config(out, resume=True, **kw))
    tr = CoTrainer(config(out, resume=True, resume_force=True, **kw))  # accepted
    assert tr._resume_state is not None
    assert "--resume-force" in capsys.readouterr().err


def test_changed_eval_data_needs_resume_force(tmp_path, good_checkpoint):
    data = write_data(tmp_path / "data")
    ds = tiny_dataset()
    write_qa(data["eval"], ds.test[:1])
    out = fresh_run_dir(tmp_path, good_checkpoint)
    with pytest.raises(UserError, match="eval data changed.*--resume-force"):
        CoTrainer(config(out, resume=True, **data))
    CoTrainer(config(out, resume=True, resume_force=True, **data))


def test_unsafe_and_safe_changes_are_all_named(tmp_path, good_checkpoint):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    cfg = config(
        out, resume=True, resume_force=True, docs=2, seed=5, log_every=3, **good_checkpoint["data"]
    )
    with pytest.raises(UserError) as info:
        CoTrainer(cfg)
    msg = str(info.value)
    assert "--docs 3 → 2" in msg and "--seed 0 → 5" in msg and "--log-every 1 → 3" in msg


def test_steps_and_progress_are_free(tmp_path, good_checkpoint):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    CoTrainer(config(out, resume=True, steps=50, progress=True, **good_checkpoint["data"]))


def test_eval_compares_only_what_shapes_the_models(tmp_path, good_checkpoint):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    d = good_checkpoint["data"]
    tr = CoTrainer(
        config(out, resume=True, lr_generator=0.5, retriever_objective="lsr", eval_limit=1, **d),
        for_eval=True,
    )
    tr.refresh_index()
    tr.load_checkpoint()
    assert tr.step == 2
    with pytest.raises(UserError, match="--generator-train-layers -1 → 2"):
        CoTrainer(config(out, resume=True, generator_train_layers=2, **d), for_eval=True)


def test_cli_resume_mismatch_one_line(tmp_path, good_checkpoint, capsys):
    out = fresh_run_dir(tmp_path, good_checkpoint)
    d = good_checkpoint["data"]
    rc = main(
        [
            "train",
            "--resume",
            "--generator",
            "tiny-random",
            "--retriever",
            "tiny-random",
            "--output-dir",
            out,
            "--corpus",
            d["corpus"],
            "--train",
            d["train"],
            "--eval",
            d["eval"],
            "--batch-size",
            "2",
            "--docs",
            "4",
            "--lr-generator",
            "1e-3",
            "--lr-retriever",
            "1e-3",
            "--warmup-steps",
            "1",
            "--generator-train-layers",
            "-1",
            "--skip-initial-eval",
            "--max-new-tokens",
            "3",
            "--eval-batch-size",
            "4",
            "--progress",
            "false",
            "--resume-force",
        ]
    )
    assert rc == 2
    line = one_error_line(capsys)
    assert "--docs 3 → 4" in line and "refused even with --resume-force" in line


# ------------------------------------------------------------------------------ 4. exact resume
N = 6


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(out)]


@pytest.fixture(scope="module", params=[1, 2], ids=["accum1", "accum2"])
def reference(request, tmp_path_factory):
    """An uninterrupted N-step run (per-step losses)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = config(out, steps=N, grad_accum=request.param)
    CoTrainer(cfg, dataset=tiny_dataset()).fit()
    return request.param, losses(out)


def assert_same_losses(got, want):
    assert [s for s, _ in got] == list(range(1, N + 1)), got  # each step logged once
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=0, abs=1e-6), (s, a, b)


def resume_and_check(out, accum, want, **kw):
    CoTrainer(
        config(out, steps=N, grad_accum=accum, resume=True, **kw), dataset=tiny_dataset()
    ).fit()
    assert_same_losses(losses(out), want)


def interrupt_run(out, accum, hook_micro=None, hook_batch=None):
    tr = CoTrainer(config(out, steps=N, grad_accum=accum), dataset=tiny_dataset())
    if hook_micro is not None:
        real = tr.micro_step

        def micro(examples):
            out_ = real(examples)
            hook_micro(tr)
            return out_

        tr.micro_step = micro
    if hook_batch is not None:
        real_b = tr._batch

        def batch():
            got = real_b()
            hook_batch(tr)
            return got

        tr._batch = batch
    with pytest.raises(SystemExit) as exc:
        tr.fit()
    assert exc.value.code == 130
    return torch.load(ckpt_path(out), weights_only=True)


K = 3  # interrupt while computing step K


def test_ctrl_c_handler_stops_at_the_step_boundary(tmp_path, reference):
    accum, want = reference

    def press(tr):
        if tr.step == K - 1 and not tr._stop_requested:
            tr._on_sigint(signal.SIGINT, None)

    st = interrupt_run(tmp_path, accum, hook_micro=press)
    assert (st["step"], st["cursor"]) == (K, K * 2 * accum)  # the step K finished, then stop
    assert [s for s, _ in losses(tmp_path)] == list(range(1, K + 1))
    resume_and_check(tmp_path, accum, want)


def test_real_sigint_stops_at_the_step_boundary(tmp_path, reference):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    accum, want = reference

    def press(tr):
        if tr.step == K - 1 and not tr._stop_requested:
            signal.raise_signal(signal.SIGINT)

    st = interrupt_run(tmp_path, accum, hook_micro=press)
    assert (st["step"], st["cursor"]) == (K, K * 2 * accum)
    resume_and_check(tmp_path, accum, want)


def test_second_ctrl_c_mid_step_rolls_the_step_back(tmp_path, reference):
    accum, want = reference

    def press_twice(tr):
        if tr.step == K - 1:
            tr._on_sigint(signal.SIGINT, None)
            tr._on_sigint(signal.SIGINT, None)  # raises KeyboardInterrupt inside the step

    st = interrupt_run(tmp_path, accum, hook_micro=press_twice)
    assert (st["step"], st["cursor"]) == (K - 1, (K - 1) * 2 * accum)
    resume_and_check(tmp_path, accum, want)


def test_keyboard_interrupt_after_the_batch_was_drawn(tmp_path, reference):
    """The tester's "STEP 35 CURSOR 36": interrupted after the step drew its questions, the
    checkpoint must not skip them (cursor consistent with step)."""
    accum, want = reference

    def boom(tr):
        if tr.step == K - 1:
            raise KeyboardInterrupt

    st = interrupt_run(tmp_path, accum, hook_batch=boom)
    assert st["cursor"] == st["step"] * 2 * accum == (K - 1) * 2 * accum
    resume_and_check(tmp_path, accum, want)


class Killed(BaseException):
    """Stands for kill -9: no clean shutdown (no checkpoint on the way out)."""


def test_kill_9_after_a_checkpoint_logs_each_step_once(tmp_path, reference, capsys):
    accum, want = reference
    tr = CoTrainer(
        config(tmp_path, steps=N, grad_accum=accum, checkpoint_every=2), dataset=tiny_dataset()
    )
    real = tr.train_step

    def dies_at_5():
        if tr.step == 5:  # steps 1..5 logged, the last checkpoint is at step 4
            raise Killed
        return real()

    tr.train_step = dies_at_5
    with pytest.raises(Killed):
        tr.fit()
    assert torch.load(ckpt_path(tmp_path), weights_only=True)["step"] == 4
    with open(os.path.join(tmp_path, "train_log.jsonl"), "a") as fh:
        fh.write('{"loss": 3.25, "generat')  # a line torn by the kill
    capsys.readouterr()
    resume_and_check(tmp_path, accum, want, checkpoint_every=2)
    err = capsys.readouterr().err
    assert "train_log.jsonl, line 6: unparsable" in err
    assert os.path.exists(os.path.join(tmp_path, "curves.png"))


def test_plot_skips_a_torn_line(tmp_path, capsys):
    log = tmp_path / "train_log.jsonl"
    rows = [
        {"step": i, "loss": 1.0 / i, "retrieval_top1": 0.5, "grad_norm_generator": 0.5}
        for i in range(1, 4)
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    plot_curves(str(log), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "line 4: unparsable" in capsys.readouterr().err


def test_plot_without_retrieval_rows_warns_nothing(tmp_path):
    """Training data without gold passages log no retrieval hits: legend() on the empty
    panel printed matplotlib's "No artists with labels" warning at the end of every run."""
    import warnings

    log = tmp_path / "train_log.jsonl"
    rows = [{"step": i, "loss": 1.0 / i, "grad_norm_generator": 0.5} for i in range(1, 4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(str(log), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_cli_resume_after_torn_log_exits_0(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    args = [
        "train",
        "--generator",
        "tiny-random",
        "--retriever",
        "tiny-random",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--docs",
        "3",
        "--output-dir",
        str(out),
        "--progress",
        "false",
        "--skip-initial-eval",
        "--max-new-tokens",
        "2",
        "--corpus",
        data["corpus"],
        "--train",
        data["train"],
        "--eval",
        data["eval"],
    ]
    assert main(args) == 0
    with open(out / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    assert main(args[:6] + ["3"] + args[7:] + ["--resume"]) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


# ------------------------------------------------------------------------------ 5. output dir
def test_second_run_on_a_locked_dir_fails_at_once(tmp_path):
    cfg = config(tmp_path / "run", steps=1)
    with RunLock(cfg.output_dir):
        tr = CoTrainer(cfg, dataset=tiny_dataset())
        with pytest.raises(UserError) as info:
            tr.fit()
        msg = str(info.value)
        assert os.path.join(cfg.output_dir, ".lock") in msg and f"pid {os.getpid()}" in msg
    tr.fit()  # released: runs


def test_cli_locked_by_another_process(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import sys; from rag_kernels.cotrain.training.files import RunLock; "
        f"l = RunLock({str(out)!r}).acquire(); print('held', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"

        def no_models(*a, **k):
            raise AssertionError("a model was loaded although the directory is locked")

        monkeypatch.setattr(loop, "load_generator", no_models)
        t0 = time.perf_counter()
        rc = main(
            [
                "train",
                "--generator",
                "tiny-random",
                "--retriever",
                "tiny-random",
                "--output-dir",
                str(out),
            ]
        )
        assert rc == 2 and time.perf_counter() - t0 < 5
        line = one_error_line(capsys)
        assert str(out / ".lock") in line and f"pid {child.pid}" in line
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_lock_is_released_by_a_crash(tmp_path):
    cfg = config(tmp_path / "run", steps=2)
    tr = CoTrainer(cfg, dataset=tiny_dataset())
    tr.train_step = lambda: (_ for _ in ()).throw(Killed())
    with pytest.raises(Killed):
        tr.fit()
    RunLock(cfg.output_dir).acquire().release()


OUTPUTS = ["metrics.json", "checkpoint.pt", "config.json", "curves.png", "train_log.jsonl"]
TEMPS = [
    "metrics.json.tmp",
    "checkpoint.pt.tmp",
    "config.json.tmp",
    "curves.png.tmp",
    "train_log.jsonl.tmp",
]


@pytest.mark.parametrize("dangling", [False, True], ids=["existing-targets", "dangling"])
def test_planted_symlinks_are_replaced_not_followed(tmp_path, dangling):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    for name in OUTPUTS + TEMPS:
        target = outside / name
        if not dangling:
            target.write_text("precious")
        os.symlink(target, run / name)
    cfg = config(run, steps=2, skip_initial_eval=False, overwrite=True)
    CoTrainer(cfg, dataset=tiny_dataset()).fit()
    for name in OUTPUTS + TEMPS:
        target = outside / name
        if dangling:
            assert not target.exists(), name
        else:
            assert target.read_text() == "precious", name
    for name in OUTPUTS:
        p = run / name
        assert p.is_file() and not p.is_symlink(), name
    leftovers = [n for n in os.listdir(run) if n.endswith(".tmp") and n not in TEMPS]
    assert not leftovers


def test_a_fresh_run_refuses_a_previous_runs_directory(tmp_path, capsys):
    """A run without --resume replaced a previous run's checkpoint, log, metrics and config
    (and a user's own metrics.json) without a word: it now refuses, naming --resume and
    --overwrite; --overwrite replaces them; files that are not a run's are never touched."""
    run = tmp_path / "run"
    CoTrainer(config(run, steps=2), dataset=tiny_dataset()).fit()
    (run / "notes.txt").write_text("mine")
    before = {n: (run / n).read_bytes() for n in OUTPUTS}
    with pytest.raises(UserError, match=r"holds a previous run \(checkpoint\.pt, metrics\.json"):
        CoTrainer(config(run, steps=1), dataset=tiny_dataset())
    assert {n: (run / n).read_bytes() for n in OUTPUTS} == before
    # the CLI: one line, exit 2, naming the ways out
    code = main(["train", "--generator", "tiny-random", "--retriever", "tiny-random",
                 "--output-dir", str(run), "--steps", "1", "--progress", "false"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--resume" in err and "--overwrite" in err, err
    # a user's metrics.json alone (no checkpoint: nothing to resume) is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds a previous run \(metrics\.json\): replace"):
        CoTrainer(config(other, steps=1), dataset=tiny_dataset())
    CoTrainer(config(run, steps=1, overwrite=True), dataset=tiny_dataset()).fit()
    assert len(read_log(run)) == 1 and (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoint.pt").read_bytes() != before["checkpoint.pt"]


def test_overwrite_removes_the_previous_run_when_training_starts(tmp_path):
    """--overwrite left the previous run's config.json, metrics.json and best/ until the new
    run ended: interrupted, the new checkpoint sat next to the old config.json (eval read it
    and scored the new weights with the old --docs), and --resume took the old metrics.json
    as its own. They are removed when the new run starts, and its config.json written."""
    run = tmp_path / "run"
    CoTrainer(config(run, steps=2, docs=2, eval_every=1), dataset=tiny_dataset(dev=True)).fit()
    assert (run / "best").is_dir() and (run / "metrics.json").exists()
    (run / "notes.txt").write_text("mine")
    tr = CoTrainer(config(run, steps=3, docs=3, overwrite=True), dataset=tiny_dataset())
    real = tr.train_step

    def step():
        out = real()
        tr._stop_requested = True  # as Ctrl-C after the first step
        return out

    tr.train_step = step
    with pytest.raises(SystemExit):
        tr.fit()
    assert sorted(os.listdir(run)) == [".lock", "checkpoint.pt", "config.json", "notes.txt",
                                       "train_log.jsonl"]  # fmt: skip
    with open(run / "config.json") as fh:
        assert json.load(fh)["docs"] == 3
    metrics = CoTrainer(config(run, steps=3, docs=3, resume=True), tiny_dataset()).fit()
    with open(run / "metrics.json") as fh:
        assert set(json.load(fh)) == set(metrics) == {"final"}
    assert (run / "notes.txt").read_text() == "mine"


def test_symlinked_lock_file_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / ".lock")
    tr = CoTrainer(config(run, steps=1), dataset=tiny_dataset())
    with pytest.raises(UserError, match="symlink"):
        tr.fit()
    assert outside.read_text() == "precious"


def test_resume_refuses_a_symlinked_checkpoint(tmp_path, good_checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(good_checkpoint["path"], run / "checkpoint.pt")
    with pytest.raises(UserError, match="symlink"):
        CoTrainer(config(run, resume=True, **good_checkpoint["data"]))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fails(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(str(path), fails)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_outputs_get_the_usual_permissions(tmp_path):
    atomic_write(str(tmp_path / "x.json"), lambda fh: fh.write(b"{}"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_config_round_trips_through_the_checkpoint(good_checkpoint):
    st = ck.read_checkpoint(good_checkpoint["path"])
    assert TrainConfig(**st["config"]) == dataclasses.replace(good_checkpoint["cfg"])
