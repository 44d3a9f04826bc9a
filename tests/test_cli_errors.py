"""User errors at the command line: ONE line ``rag-kernels: error: ...`` on stderr, exit 2,
no traceback (``--debug`` adds it); every option validated, from flags and config files,
before anything heavy is imported or any model is loaded; input and config files named
with the line that is wrong."""

import json
import os
import subprocess
import sys
import time

import pytest

from rag_kernels.cotrain.cli import main
from rag_kernels.cotrain.data import Passage, QAExample, write_corpus, write_qa
from rag_kernels.cotrain.errors import UserError
from rag_kernels.cotrain.training import build_parser, resolve_config
from rag_kernels.cotrain.training import loop as loop_module
from toolkit import cli_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--generator", "tiny-random", "--retriever", "tiny-random"]


run_cli = cli_error_line


def tiny_files(d) -> dict:
    os.makedirs(d, exist_ok=True)
    corpus = [Passage(f"p{i}", f"T{i}", f"Passage number {i} is about item {i}.") for i in range(6)]
    qa = [
        QAExample(f"q{i}", f"What is passage {i} about?", [f"item {i}"], [f"p{i}"])
        for i in range(6)
    ]
    paths = {k: os.path.join(d, f"{k}.jsonl") for k in ("corpus", "train", "eval")}
    write_corpus(paths["corpus"], corpus)
    write_qa(paths["train"], qa[:4])
    write_qa(paths["eval"], qa[4:])
    return paths


def data_args(paths) -> list[str]:
    return ["--corpus", paths["corpus"], "--train", paths["train"], "--eval", paths["eval"]]


# ------------------------------------------------------------------------------ bad flag values
BAD_FLAGS = [
    ("--lr-generator", "nan"),
    ("--lr-generator", "-1"),
    ("--lr-generator", "fast"),
    ("--lr-retriever", "inf"),
    ("--lr-retriever", "-inf"),
    ("--max-grad-norm", "nan"),
    ("--max-grad-norm", "-1"),
    ("--max-doc-tokens", "0"),
    ("--eval-limit", "-1"),
    ("--label-smoothing", "1"),
    ("--label-smoothing", "-0.1"),
    ("--label-smoothing", "nan"),
    ("--score-scale", "0"),
    ("--score-scale", "-3"),
    ("--score-scale", "inf"),
    ("--score-scale", "1e39"),  # the scores overflow float32: it crashed at the first step
    ("--retriever-temperature", "0"),
    ("--retriever-temperature", "nan"),
    ("--generator-temperature", "-1"),
    ("--generator-temperature", "1e-40"),  # subnormal in fp32: the objectives refuse it
    ("--retriever-temperature", "1e-39"),
    ("--generator-weight", "-1"),
    ("--retriever-weight", "-0.5"),
    ("--retriever-weight", "nan"),
    ("--log-every", "0"),
    ("--eval-batch-size", "0"),
    ("--max-new-tokens", "-1"),
    ("--max-new-tokens", "0"),
    ("--docs", "0"),
    ("--batch-size", "0"),
    ("--grad-accum", "0"),
    ("--steps", "-1"),
    ("--steps", "x"),
    ("--steps", "1.5"),
    ("--weight-decay", "-0.1"),
    ("--warmup-steps", "-1"),
    ("--seed", "-1"),
    ("--data-seed", "-1"),
    ("--seed", str(2**32)),
    ("--rerank", "0"),
    ("--refresh-every", "-1"),
    ("--checkpoint-every", "-1"),
    ("--generator-train-layers", "-2"),
    ("--retriever-freeze-steps", "-1"),
    ("--retriever-warmup-steps", "-1"),
    ("--mode", "foo"),
    ("--retriever-objective", "bar"),
    ("--index", "hnsw"),
    ("--doc-encoder", "other"),
    ("--balancing", "magic"),
    ("--freeze-retriever", "maybe"),
    ("--progress", "2"),
    ("--output-dir", ""),
]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("flag, value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_bad_flag_value(no_models, capsys, command, flag, value):
    out = [] if flag == "--output-dir" else ["--output-dir", "out"]
    line = run_cli(capsys, command, *TINY, flag, value, *out)
    assert flag in line, line
    assert not os.path.exists("out"), "nothing may be written for an invalid option"


def test_unknown_flag_and_command(no_models, capsys):
    assert "unrecognized arguments: --bogus" in run_cli(capsys, "train", "--bogus", "1")
    assert "unknown command 'trian'" in run_cli(capsys, "trian")


def test_both_freezes(no_models, capsys):
    line = run_cli(capsys, "train", "--freeze-retriever", "--freeze-generator", "--output-dir", "o")
    assert "nothing to train" in line


def test_demo_bad_values(capsys):
    assert "--docs 0" in run_cli(capsys, "demo", "--docs", "0")
    assert "--docs" in run_cli(capsys, "demo", "--docs", "x")


# ------------------------------------------------------------------------------ config files
BAD_CONFIGS = [
    (
        "c.json",
        '{"freeze_retriever": "maybe"}',
        "c.json, line 1: freeze_retriever: expected a boolean",
    ),
    (
        "c.json",
        '{\n  "steps": 3,\n  "lr_generator": "nan"\n}',
        "c.json, line 3: lr_generator: must be finite",
    ),
    ("c.toml", "steps = 3\nlr_generator = nan\n", "c.toml, line 2: lr_generator: must be finite"),
    ("c.toml", "lr_retriever = inf\n", "c.toml, line 1: lr_retriever: must be finite"),
    ("c.toml", 'steps = "many"\n', "c.toml, line 1: steps: expected an integer"),
    ("c.toml", "steps = true\n", "c.toml, line 1: steps: expected an integer"),
    ("c.toml", "freeze_retriever = 2\n", "c.toml, line 1: freeze_retriever: expected a boolean"),
    ("c.toml", "label_smoothing = 1.5\n", "c.toml, line 1: label_smoothing: must be in [0, 1)"),
    ("c.toml", "max-doc-tokens = 0\n", "c.toml, line 1: max_doc_tokens: must be >= 1"),
    ("c.yaml", "steps: 3\nlog_every: 0\n", "c.yaml, line 2: log_every: must be >= 1"),
    ("c.yaml", "mode: foo\n", "c.yaml, line 1: mode: must be one of sequence, token"),
    ("c.yaml", "docs: 2.5\n", "c.yaml, line 1: docs: expected an integer"),
    ("c.yaml", "docs: null\n", "c.yaml, line 1: docs: expected an integer, got null"),
    ("c.yaml", "corpus: 5\n", "c.yaml, line 1: corpus: expected a string"),
    ("c.yaml", "eval_limit: -1\n", "c.yaml, line 1: eval_limit: must be >= 0"),
    ("c.yaml", "score_scale: 0\n", "c.yaml, line 1: score_scale: must be > 0"),
    ("c.yaml", "retriever_weight: -1\n", "c.yaml, line 1: retriever_weight: must be >= 0"),
    ("c.yaml", "max_new_tokens: -1\n", "c.yaml, line 1: max_new_tokens: must be >= 1"),
    ("c.yaml", "generator: /nonexistent\n", "c.yaml, line 1: generator: no such model directory"),
    ("c.yaml", "stepz: 3\n", "c.yaml, line 1: unknown option 'stepz' (did you mean 'steps'?)"),
    ("c.yaml", "- 1\n- 2\n", "c.yaml: expected a mapping of option names to values, got list"),
    ("c.toml", "steps = = 3\n", "c.toml, line 1: invalid TOML"),
    ("c.toml", "steps = 3\nmode = 'token\n", "c.toml, line 2: invalid TOML"),
    ("c.yaml", "steps: [1\nmode: token\n", "c.yaml, line 2: invalid YAML"),
    ("c.json", '{"steps": 3,}', "c.json, line 1: invalid JSON"),
    ("c.json", "", "c.json, line 1: invalid JSON"),
    ("c.toml", b'steps = 3\nmode = "\xff"\n', "c.toml, line 2: not valid UTF-8"),
    ("c.yaml", b"steps: 3\n\nmode: \xc3\x28\n", "c.yaml, line 3: not valid UTF-8"),
    ("c.json", b'{"mode": "\xfe"}', "c.json, line 1: not valid UTF-8"),
    ("c.ini", "steps = 3\n", "use a .toml, .yaml/.yml or .json file"),
    # a key given twice was silently last-wins in YAML and JSON (TOML refuses it itself)
    ("c.yaml", "steps: 2\nlog_every: 1\nsteps: 3\n", "c.yaml, line 3: invalid YAML: duplicate key"),
    ("c.json", '{"steps": 2, "steps": 3}', "c.json: invalid JSON: duplicate key 'steps'"),
    ("c.toml", "steps = 2\nsteps = 3\n", "c.toml, line 2: invalid TOML"),
    ("c.toml", "lr-generator = 1e-4\nlr_generator = 2e-4\n", "option lr_generator is set twice"),
]


@pytest.mark.parametrize(
    "name, content, expect", BAD_CONFIGS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_CONFIGS)]
)
def test_bad_config_file(no_models, capsys, tmp_path, name, content, expect):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    line = run_cli(capsys, "train", "--config", str(path), "--output-dir", "out")
    want = os.path.join(str(tmp_path), expect) if expect.startswith("c.") else expect
    assert want in line, line


def test_missing_or_directory_config(no_models, capsys, tmp_path):
    assert "no such file" in run_cli(capsys, "train", "--config", str(tmp_path / "none.toml"))
    d = tmp_path / "dir.yaml"
    d.mkdir()
    assert "is a directory" in run_cli(capsys, "train", "--config", str(d))


@pytest.mark.parametrize(
    "text, want",
    [
        ('{"freeze_retriever": "no"}', False),
        ('{"freeze_retriever": "yes"}', True),
        ('{"freeze_retriever": "0"}', False),
        ('{"freeze_retriever": "False"}', False),
        ('{"freeze_retriever": "true"}', True),
        ('{"freeze_retriever": 1}', True),
        ('{"freeze_retriever": 0}', False),
        ('{"freeze_retriever": false}', False),
    ],
)
def test_booleans_from_files_are_parsed_not_truthy(tmp_path, text, want):
    path = tmp_path / "c.json"
    path.write_text(text)
    cfg = resolve_config(build_parser("t", "x").parse_args(["--config", str(path)]))
    assert cfg.freeze_retriever is want


def test_yaml_numbers_and_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr_generator: 1e-3\nsteps: '7'\nfreeze_retriever: off\nprogress: 'no'\n")
    cfg = resolve_config(build_parser("t", "x").parse_args(["--config", str(path), "--steps", "9"]))
    assert (cfg.lr_generator, cfg.steps, cfg.freeze_retriever, cfg.progress) == (
        1e-3,
        9,
        False,
        False,
    )
    assert isinstance(cfg.lr_generator, float)


def test_flag_overrides_a_bad_file_value(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("log_every = 0\n")
    cfg = resolve_config(
        build_parser("t", "x").parse_args(["--config", str(path), "--log-every", "2"])
    )
    assert cfg.log_every == 2


def test_user_error_is_a_value_error():
    with pytest.raises(ValueError):
        raise UserError("x")


# ------------------------------------------------------------------------------ input data
def _corrupt(paths, which, kind):
    p = paths[which]
    if kind == "empty":
        open(p, "w").close()
    elif kind == "missing":
        os.remove(p)
    elif kind == "directory":
        os.remove(p)
        os.mkdir(p)
    elif kind == "bad-json-line2":
        lines = open(p).read().splitlines()
        lines[1] = lines[1][:-3]
        open(p, "w").write("\n".join(lines) + "\n")
    elif kind == "bad-utf8-line3":
        lines = open(p, "rb").read().splitlines()
        lines[2] = lines[2].replace(b"is", b"\xff\xfe")
        open(p, "wb").write(b"\n".join(lines) + b"\n")
    elif kind == "not-an-object-line1":
        lines = open(p).read().splitlines()
        lines[0] = "[1, 2]"
        open(p, "w").write("\n".join(lines) + "\n")


DATA_CASES = [
    ("corpus", "missing", "--corpus {p}: no such file"),
    ("corpus", "directory", "--corpus {p}: is a directory"),
    ("corpus", "empty", "{p}: the corpus is empty"),
    ("corpus", "bad-json-line2", "{p}, line 2: invalid JSON"),
    ("corpus", "bad-utf8-line3", "{p}, line 3: not valid UTF-8"),
    ("train", "missing", "--train {p}: no such file"),
    ("train", "empty", "{p}: no training questions"),
    ("train", "bad-json-line2", "{p}, line 2: invalid JSON"),
    ("train", "bad-utf8-line3", "{p}, line 3: not valid UTF-8"),
    ("train", "not-an-object-line1", "{p}, line 1: expected a JSON object"),
    ("eval", "directory", "--eval {p}: is a directory"),
    ("eval", "empty", "{p}: no evaluation questions"),
    ("eval", "bad-utf8-line3", "{p}, line 1: not valid UTF-8"),  # eval has 2 lines: see below
]


@pytest.mark.parametrize(
    "which, kind, expect", DATA_CASES, ids=[f"{w}-{k}" for w, k, _ in DATA_CASES]
)
def test_bad_input_data(no_models, capsys, tmp_path, which, kind, expect):
    paths = tiny_files(tmp_path / "data")
    if which == "eval" and kind == "bad-utf8-line3":
        open(paths["eval"], "ab").write(b'{"id": "\xff"}\n')  # line 3 of the eval file
        expect = "{p}, line 3: not valid UTF-8"
    else:
        _corrupt(paths, which, kind)
    out = tmp_path / "runs" / "out"
    line = run_cli(capsys, "train", *TINY, *data_args(paths), "--output-dir", str(out))
    assert expect.format(p=paths[which]) in line, line
    # the failed run created runs/out (and its lock) only to find the data bad: both are gone
    assert not (tmp_path / "runs").exists(), os.listdir(tmp_path / "runs")


def test_failed_run_keeps_a_directory_it_did_not_create(no_models, capsys, tmp_path):
    paths = tiny_files(tmp_path / "data")
    _corrupt(paths, "train", "empty")
    out = tmp_path / "mine"
    out.mkdir()
    line = run_cli(capsys, "train", *TINY, *data_args(paths), "--output-dir", str(out))
    assert "no training questions" in line
    assert out.is_dir()  # the user's (empty) directory stays
    (out / "notes.txt").write_text("mine")
    sub = out / "run"
    line = run_cli(capsys, "train", *TINY, *data_args(paths), "--output-dir", str(sub))
    assert "no training questions" in line and not sub.exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_positive_id_not_in_corpus(no_models, capsys, tmp_path):
    paths = tiny_files(tmp_path / "data")
    write_qa(paths["train"], [QAExample("q1", "?", ["a"], ["nope"])])
    line = run_cli(capsys, "train", *TINY, *data_args(paths), "--output-dir", "out")
    assert f"{paths['train']}, line 1: positive_ids not in the corpus" in line


# ------------------------------------------------------------------------------ paths
def test_output_dir_problems(no_models, capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert "exists and is not a directory" in run_cli(capsys, "train", "--output-dir", str(f))
    line = run_cli(capsys, "train", *TINY, "--output-dir", str(f / "sub"))
    assert f"--output-dir {f / 'sub'}" in line and "cannot create" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_dir(no_models, capsys, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        assert "not writable" in run_cli(capsys, "train", *TINY, "--output-dir", str(d / "run"))
    finally:
        d.chmod(0o700)


@pytest.mark.parametrize("flag", ["--generator", "--retriever"])
def test_nonexistent_model_paths(no_models, capsys, tmp_path, flag):
    assert f"{flag} /nonexistent: no such model directory" in run_cli(
        capsys, "train", flag, "/nonexistent", "--output-dir", "out"
    )
    assert "no such model directory" in run_cli(capsys, "train", flag, "./no/such/model")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert "not a model directory (it has no config.json)" in run_cli(
        capsys, "train", flag, str(empty)
    )
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    assert "is a file" in run_cli(capsys, "train", flag, str(f))
    # eval takes the models from the run (its config.json): a model flag is refused
    assert f"eval does not take training options: {flag}" in run_cli(capsys, "eval", flag, str(f))


def test_unknown_hub_model_is_one_line(monkeypatch, capsys, tmp_path):
    """An ``org/name`` that is neither a local directory nor in the (offline) HF cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = tiny_files(tmp_path / "data")
    line = run_cli(
        capsys,
        "train",
        "--generator",
        "no-such-org/no-such-model",
        "--retriever",
        "tiny-random",
        *data_args(paths),
        "--output-dir",
        "out",
    )
    assert "--generator no-such-org/no-such-model: cannot load the model" in line


# ------------------------------------------------------------------------------ debug, bugs
def test_debug_shows_the_traceback_of_a_user_error(no_models, capsys):
    rc = main(["train", "--lr-generator", "nan", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err
    assert (
        err.strip().splitlines()[-1]
        == "rag-kernels: error: --lr-generator nan: must be finite and >= 0"
    )


def test_a_bug_keeps_its_traceback(no_models, monkeypatch, tmp_path):
    class Boom(loop_module.CoTrainer):
        def __init__(self, *a, **k):
            raise RuntimeError("a bug")

    monkeypatch.setattr(loop_module, "CoTrainer", Boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *TINY, "--output-dir", str(tmp_path / "o")])


# ------------------------------------------------------------------------------ speed
def test_invalid_option_fails_fast_in_a_fresh_process(tmp_path):
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "rag_kernels", "train", "--lr-generator", "nan"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    wall = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [
        "rag-kernels: error: --lr-generator nan: must be finite and >= 0"
    ]
    assert p.stdout == ""
    assert wall < 10, wall  # measured ~1 s; the budget is 5 s, 10 s allows for slow CI
    assert not os.listdir(tmp_path)  # no runs/default created


def test_nothing_heavy_is_imported_before_validation(tmp_path):
    code = (
        "import sys, json\n"
        "from rag_kernels.cotrain.cli import main\n"
        "rc = main(['train', '--lr-generator', 'nan'])\n"
        "heavy = ['transformers', 'faiss', 'matplotlib', 'rag_kernels.cotrain.training.loop',\n"
        "         'rag_kernels.cotrain.models', 'rag_kernels.cotrain.retrieval', 'yaml']\n"
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


DEEP = 100_000  # brackets inside each other: json, yaml and tomllib raise RecursionError


@pytest.mark.parametrize("kind", ["corpus-jsonl", "train-dpr-json", "json", "yaml", "toml"])
def test_deeply_nested_input_is_a_user_error(no_models, capsys, tmp_path, kind):
    deep = "[" * DEEP + "]" * DEEP
    paths = tiny_files(tmp_path / "data")
    if kind == "corpus-jsonl":
        p = tmp_path / "corpus.jsonl"
        p.write_text('{"id": "p1", "text": "x", "meta": ' + deep + "}\n")
        argv, want = [*data_args(paths)[2:], "--corpus", str(p)], f"{p}, line 1: invalid JSON"
    elif kind == "train-dpr-json":
        p = tmp_path / "train.json"
        p.write_text('[{"question": "q?", "answers": ["a"], "x": ' + deep + "}]")
        argv = ["--corpus", paths["corpus"], "--eval", paths["eval"], "--train", str(p)]
        want = f"{p}, line 1: invalid JSON"
    else:
        p = tmp_path / f"run.{kind}"
        p.write_text({"json": '{"steps": ' + deep + "}", "yaml": "steps: " + deep + "\n",
                      "toml": "steps = " + deep + "\n"}[kind])  # fmt: skip
        argv, want = ["--config", str(p)], f"{p}: invalid {kind.upper()}: nested too deeply"
    line = run_cli(capsys, "train", *TINY, *argv, "--output-dir", str(tmp_path / "out"))
    assert want in line and "nested too deeply" in line, line
