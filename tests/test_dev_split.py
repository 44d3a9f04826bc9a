"""``--dev FILE``: the dev split that ``--eval-every`` evaluates on (and ``best/`` is selected
by) for the user's own data: loaded like ``--eval`` (formats, auto-detection, a BEIR folder's
``qrels/dev.tsv``), one-line errors naming ``--dev``, it replaces the embedded dev split, and
resuming with changed dev data needs ``--resume-force``; ``eval`` neither takes nor reads it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rag_kernels.cotrain.cli import main
from rag_kernels.cotrain.data import (
    Dataset,
    QAExample,
    data_path_problem,
    load_default,
    load_questions_file,
    write_qa,
)
from rag_kernels.cotrain.errors import UserError
from rag_kernels.cotrain.training import CoTrainer, TrainConfig
from rag_kernels.cotrain.training.config import RESUME_FREE, resume_differences
from rag_kernels.cotrain.training.loop import load_dataset
from toolkit import cli_error_line, tiny_dataset

pytest.importorskip("faiss")
pytest.importorskip("transformers")

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = ["--generator", "tiny-random", "--retriever", "tiny-random"]
FAST = ["--progress", "false", "--max-new-tokens", "2", "--docs", "2", "--batch-size", "2",
        "--skip-initial-eval", "--warmup-steps", "0"]  # fmt: skip


def fx(*parts) -> str:
    return os.path.join(FIX, *parts)


OURS = ["--corpus", fx("ours", "corpus.jsonl"), "--train", fx("ours", "train.jsonl"),
        "--eval", fx("ours", "eval.jsonl")]  # fmt: skip


def write(path, text: str) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return str(path)


def dev_file(path, *ids: int) -> str:
    """An ours-format dev file with the fixture's tower questions ``ids``."""
    names = ["Varn", "Hesk", "Dorrow", "Quellen", "Sotha", "Ilva"]
    makers = ["Oskar", "Teodor", "Lina", "Mirza", "Pell", "Ruun"]
    rows = [
        {"id": f"d{i}", "question": f"Who built the tower of {names[i]}?",
         "answers": [makers[i]], "positive_ids": [f"p{i}"]}
        for i in ids
    ]  # fmt: skip
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def cfg_of(**kw) -> TrainConfig:
    return TrainConfig(generator="tiny-random", retriever="tiny-random", **kw)


# ------------------------------------------------------------------ loading
def test_dev_option_and_resume_rules():
    assert TrainConfig().dev is None
    assert "dev" in RESUME_FREE  # the path; the content is compared by its fingerprint
    old, new = TrainConfig().to_dict(), TrainConfig(dev="d.jsonl").to_dict()
    data = {"corpus": "c", "train": "t", "eval": "e", "world_size": 1}
    assert resume_differences(old, new, data, dict(data, dev="x")) == ([], [])  # no dev print
    unsafe, safe = resume_differences(old, new, dict(data, dev="a"), dict(data, dev="b"))
    assert unsafe == [] and len(safe) == 1
    assert safe[0].startswith("dev data changed (--dev embedded set → d.jsonl; content sha256")
    for_eval = resume_differences(old, new, dict(data, dev="a"), dict(data, dev="b"), for_eval=True)
    assert for_eval == ([], [])  # eval compares only the data the models depend on


def test_dev_file_fills_the_dev_split_in_any_format(tmp_path):
    ours = dev_file(tmp_path / "dev.jsonl", 2, 3)
    ds = load_dataset(cfg_of(corpus=fx("ours", "corpus.jsonl"), train=fx("ours", "train.jsonl"),
                             dev=ours, eval=fx("ours", "eval.jsonl")))  # fmt: skip
    assert [(q.id, q.answers, q.positive_ids) for q in ds.dev] == [
        ("d2", ["Lina"], ["p2"]),
        ("d3", ["Mirza"], ["p3"]),
    ]
    assert [q.id for q in ds.test] == ["q4", "q5"] and len(ds.train) == 4
    # auto-detected per file: an NQ-open dev file next to an ours corpus (no gold passages)
    ds = load_dataset(cfg_of(corpus=fx("ours", "corpus.jsonl"), dev=fx("nq-open", "dev.jsonl")))
    assert [(q.question, q.answers, q.positive_ids) for q in ds.dev] == [
        ("Who built the tower of Sotha?", ["Pell"], []),
        ("Who built the tower of Ilva?", ["Ruun"], []),
    ]
    # --data-format applies to --dev like to the other files
    cfg = cfg_of(corpus=fx("ours", "corpus.jsonl"), dev=fx("nq-open", "dev.jsonl"),
                 data_format="ours")  # fmt: skip
    with pytest.raises(UserError, match=r"^--dev .*dev\.jsonl, line 1: "):
        load_dataset(cfg)


def test_beir_folder_dev_split_is_its_dev_qrels(tmp_path):
    d = tmp_path / "beir"
    shutil.copytree(fx("beir"), d)
    d = str(d)
    assert data_path_problem(d, "dev").startswith(
        "is a BEIR folder without qrels/dev.tsv for --dev (it has qrels/test.tsv, qrels/train.tsv)"
    )
    write(os.path.join(d, "qrels", "dev.tsv"), "query-id\tcorpus-id\tscore\nq3\tp3\t1\n")
    assert data_path_problem(d, "dev") is None
    ds = load_dataset(cfg_of(corpus=d, train=d, dev=d, eval=d))
    assert [(q.id, q.answers, q.positive_ids) for q in ds.dev] == [("q3", ["Mirza"], ["p3"])]
    assert [q.id for q in ds.test] == ["q4", "q5"]  # --eval still reads qrels/test.tsv
    assert [q.id for q in ds.train] == ["q0", "q1", "q2", "q3"]
    # a qrels file names its split itself; queries.jsonl means the folder's dev.tsv
    qrels = os.path.join(d, "qrels", "test.tsv")
    assert [q.id for q in load_questions_file(qrels, split="dev")] == ["q4", "q5"]
    queries = os.path.join(d, "queries.jsonl")
    assert [q.id for q in load_questions_file(queries, split="dev")] == ["q3"]
    with pytest.raises(ValueError, match="split must be 'train', 'dev' or 'eval'"):
        load_questions_file(queries, split="test")


def test_dev_replaces_the_embedded_dev_split(tmp_path):
    base = load_default()
    path = str(tmp_path / "dev.jsonl")
    write_qa(path, base.test[:3])
    ds = load_dataset(cfg_of(dev=path))
    assert ds.dev == base.test[:3] and ds.dev != base.dev
    assert ds.train == base.train and ds.test == base.test and ds.corpus == base.corpus
    # its gold passages are checked against the embedded corpus
    bad = dev_file(tmp_path / "bad.jsonl", 0)  # positive "p0": not an embedded corpus id
    with pytest.raises(UserError, match=rf"^--dev {bad}, line 1: .*p0"):
        load_dataset(cfg_of(dev=bad))


# ------------------------------------------------------------------ one-line errors
def test_dev_errors_name_the_option(no_models, capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "run")]
    base = ["train", *TINY, *OURS, *out, "--eval-every", "1"]
    nope = str(tmp_path / "nope.jsonl")
    line = cli_error_line(capsys, *base, "--dev", nope)
    assert line.endswith(f"--dev {nope}: no such file")
    empty = write(tmp_path / "empty.jsonl", "\n")
    line = cli_error_line(capsys, *base, "--dev", empty)
    assert line.endswith(f"--dev {empty}: no dev questions (the file is empty)")
    bad = write(tmp_path / "bad.jsonl", '{"id": "d0", "question": "Who?", "answers": ["x"]}\n{oops')
    line = cli_error_line(capsys, *base, "--dev", bad)
    assert f"--dev {bad}, line 2: " in line and "JSON" in line
    good = '{"id": "d0", "question": "Who?", "answers": ["x"]}\n'
    bad = write(tmp_path / "bad2.jsonl", good + '{"id": "d1", "question": "Who built it?"}\n')
    line = cli_error_line(capsys, *base, "--dev", bad)
    assert f"--dev {bad}, line 2: " in line and "answers" in line
    bad = write(tmp_path / "bad3.jsonl", '{"id": "d0", "text": "a passage"}\n')  # by its keys
    line = cli_error_line(capsys, *base, "--dev", bad)
    assert f"--dev {bad}, line 1: this looks like a corpus, not a question file" in line
    beir = fx("beir")
    line = cli_error_line(capsys, *base, "--dev", beir)
    assert f"--dev {beir}: is a BEIR folder without qrels/dev.tsv for --dev" in line
    # eval does not take --dev (it evaluates --eval)
    line = cli_error_line(capsys, "eval", "--dev", empty, *out)
    assert "eval does not take training options: --dev" in line


def test_eval_every_on_user_files_needs_dev(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--output-dir", str(tmp_path / "run")]
    line = cli_error_line(capsys, "train", *TINY, *OURS, *out, *FAST, "--steps", "1",
                          "--eval-every", "1")  # fmt: skip
    assert "--eval-every 1: the data has no dev split to evaluate on" in line
    assert "--dev FILE" in line


def test_best_metric_must_exist_on_the_dev_split(tmp_path):
    ds = tiny_dataset(dev=True)
    no_answers = [QAExample(q.id, q.question, [], q.positive_ids) for q in ds.dev]
    ds = Dataset(corpus=ds.corpus, train=ds.train, dev=no_answers, test=ds.test)
    cfg = cfg_of(steps=1, batch_size=2, docs=2, eval_every=1, progress=False,
                 skip_initial_eval=True, output_dir=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(UserError, match="--best-metric f1: no dev question has answers"):
        CoTrainer(cfg, dataset=ds).fit()


# ------------------------------------------------------------------ end to end
def test_train_with_dev_keeps_best_and_resume_compares_dev(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "run")
    dev = dev_file(tmp_path / "dev.jsonl", 1, 2, 3)
    argv = ["train", *TINY, *OURS, *FAST, "--output-dir", out, "--eval-every", "1",
            "--best-metric", "mrr@10", "--dev", dev]  # fmt: skip
    assert main([*argv, "--steps", "2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["dev_n"] == 3 and "dev_mrr@10" in r and "dev_f1" in r for r in log)
    best = os.path.join(out, "best")
    assert sorted(os.listdir(best)) == ["checkpoint.pt", "config.json", "metrics.json"]
    with open(os.path.join(best, "metrics.json")) as fh:
        meta = json.load(fh)
    assert meta["metric"] == "mrr@10" and meta["dev"]["n"] == 3
    assert meta["value"] == max(r["dev_mrr@10"] for r in log)
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["dev"] == dev

    # resuming with other dev data: refused without --resume-force, accepted with it
    changed = dev_file(tmp_path / "dev2.jsonl", 1, 2)
    resume = [*argv[:-1], changed, "--resume", "--steps", "3"]
    line = cli_error_line(capsys, *resume)
    assert f"dev data changed (--dev {dev} → {changed}; content sha256" in line
    assert "add --resume-force" in line
    assert main([*resume, "--resume-force"]) == 0, capsys.readouterr().err
    assert "dev data changed" in capsys.readouterr().err  # the --resume-force warning
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["dev_n"] == 2

    # eval reads the run's config.json but not its dev file
    os.remove(changed)
    rc = main(["eval", "--output-dir", out, "--resume", "--progress", "false"])
    assert rc == 0, capsys.readouterr().err
