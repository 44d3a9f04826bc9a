"""Input data formats (ours, BEIR, DPR, NQ-open, KILT, FlashRAG): each streaming loader's
output on the fixtures in tests/fixtures/, auto-detection and --data-format, malformed records
named ``<file>, line <n>``, the gold-passage policy, retrieval-only BEIR data, and every
format's fixture through ``rag-kernels train --steps 2`` and ``rag-kernels eval --resume``."""

import json
import os
import shutil

import pytest

from rag_kernels.cotrain.cli import main
from rag_kernels.cotrain.data import (
    DATA_FORMATS,
    Passage,
    QAExample,
    data_path_problem,
    detect_format,
    iter_json_array,
    load_corpus_file,
    load_dataset_files,
    load_questions_file,
    training_answers_problem,
)
from rag_kernels.cotrain.training import loop as loop_module
from rag_kernels.cotrain.training.config import TrainConfig, resume_differences

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = ["--generator", "tiny-random", "--retriever", "tiny-random"]

# (format, corpus, train, eval) of each fixture; nq-open has no corpus file: DPR passages
RUNS = {
    "ours": ("ours/corpus.jsonl", "ours/train.jsonl", "ours/eval.jsonl"),
    "beir": ("beir", "beir", "beir"),
    "dpr": ("dpr/psgs.tsv", "dpr/train.json", "dpr/test.csv"),
    "nq-open": ("dpr/psgs.tsv", "nq-open/train.jsonl", "nq-open/dev.jsonl"),
    "kilt": ("kilt/knowledge.jsonl", "kilt/train.jsonl", "kilt/dev.jsonl"),
    "flashrag": ("flashrag/corpus.jsonl", "flashrag/train.jsonl", "flashrag/test.jsonl"),
}
NAMES = ["Varn", "Hesk", "Dorrow", "Quellen", "Sotha", "Ilva"]
MAKERS = ["Oskar", "Teodor", "Lina", "Mirza", "Pell", "Ruun"]
# the corpus ids of passage i in each format, and whether the questions name gold passages
PID = {
    "ours": lambda i: f"p{i}",
    "beir": lambda i: f"p{i}",
    "dpr": lambda i: str(i + 1),
    "nq-open": lambda i: str(i + 1),
    "kilt": lambda i: str(100 + i),
    "flashrag": lambda i: str(i),
}
GOLD = {"ours": True, "beir": True, "dpr": True, "nq-open": False, "kilt": True, "flashrag": False}


def fx(*parts) -> str:
    return os.path.join(FIX, *parts)


def paths(fmt):
    return tuple(fx(p) for p in RUNS[fmt])


def write(path, text: str | bytes) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a model is loaded (data problems must be reported first)."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(loop_module, "load_generator", boom)
    monkeypatch.setattr(loop_module, "load_retriever", boom)


def run_cli_error(capsys, *argv) -> str:
    rc = main(list(argv))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in err if ln.startswith("rag-kernels: error: ")]
    assert rc == 2 and len(errors) == 1, err
    assert not any("Traceback" in ln for ln in err)
    return errors[0]


# ------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("fmt", list(RUNS))
def test_each_format_loads_the_same_data(fmt):
    corpus, train, eval_ = paths(fmt)
    assert detect_format(corpus, "corpus") == ("dpr" if fmt == "nq-open" else fmt)
    assert detect_format(train, "train") == fmt
    assert detect_format(eval_, "eval") == fmt
    ds = load_dataset_files(corpus, train, eval_)
    pid = PID[fmt]
    assert [(p.id, p.title, p.text) for p in ds.corpus] == [
        (pid(i), f"Tower of {n}", f"The tower of {n} was built by {m} in spring.")
        for i, (n, m) in enumerate(zip(NAMES, MAKERS, strict=True))
    ]
    for split, idx in ((ds.train, range(4)), (ds.test, range(4, 6))):
        assert [q.question for q in split] == [f"Who built the tower of {NAMES[i]}?" for i in idx]
        assert [q.answers[0] for q in split] == [MAKERS[i] for i in idx]
        gold_expected = GOLD[fmt] and not (fmt == "dpr" and split is ds.test)  # DPR QA TSV
        assert [q.positive_ids for q in split] == [[pid(i)] if gold_expected else [] for i in idx]
        assert len({q.id for q in split}) == len(split)
    assert ds.dev == []


def test_format_details():
    # KILT: every output answer, deduplicated; FlashRAG: a quoted title line is unquoted
    kilt = load_questions_file(fx("kilt/train.jsonl"), corpus_ids={"100"})
    assert kilt[0].answers == ["Oskar", "oskar"] and kilt[0].positive_ids == ["100"]
    assert kilt[1].positive_ids == []  # provenance 101 is not in that corpus
    fr = load_corpus_file(fx("flashrag/corpus.jsonl"))
    assert fr[0] == Passage("0", "Tower of Varn", "The tower of Varn was built by Oskar in spring.")
    # DPR: a positive matched by (title, text) when it has no passage_id (fixture: odd ones)
    corpus = load_corpus_file(fx("dpr/psgs.tsv"))
    dpr = load_questions_file(fx("dpr/train.json"), corpus=corpus)
    assert [q.positive_ids for q in dpr] == [["1"], ["2"], ["3"], ["4"]]
    # without a corpus only passage_id can name a gold passage
    assert [q.positive_ids for q in load_questions_file(fx("dpr/train.json"))] == [
        ["1"],
        [],
        ["3"],
        [],
    ]
    # the DPR QA file: no header, tab-separated, a Python list of answers
    assert load_questions_file(fx("dpr/test.csv"), split="eval") == [
        QAExample("0", "Who built the tower of Sotha?", ["Pell"], []),
        QAExample("1", "Who built the tower of Ilva?", ["Ruun"], []),
    ]


def test_dpr_tsv_quoting_and_jsonl_variant(tmp_path):
    psgs = write(
        tmp_path / "psgs.tsv",
        'id\ttext\ttitle\n7\t"He said ""hi""\tthere"\tGreeting\n8\tplain text\t\n',
    )
    assert load_corpus_file(psgs) == [
        Passage("7", "Greeting", 'He said "hi"\tthere'),
        Passage("8", "", "plain text"),
    ]
    qa = write(tmp_path / "qa.tsv", 'who?\t["A \\"x\\"", "b"]\nwhat?\t[\'c\']\n')
    assert [q.answers for q in load_questions_file(qa)] == [['A "x"', "b"], ["c"]]
    lines = write(
        tmp_path / "dpr.jsonl",
        '{"question": "q?", "answers": ["a"], "positive_ctxs": [{"passage_id": 7}]}\n',
    )
    assert detect_format(lines, "train") == "dpr"
    assert load_questions_file(lines, corpus_ids={"7"})[0].positive_ids == ["7"]


def test_beir_split_files_and_answers(tmp_path):
    d = fx("beir")
    corpus = load_corpus_file(d)
    # a folder: --train uses qrels/train.tsv, --eval qrels/test.tsv; score 0 is not gold
    train = load_questions_file(d, split="train", corpus=corpus)
    assert [q.id for q in train] == ["q0", "q1", "q2", "q3"]
    assert train[0].positive_ids == ["p0"]  # "q0 p5 0" in train.tsv is a negative
    assert train[0].answers == ["Oskar"]  # from metadata.answer
    # the files themselves: a qrels file picks the split, queries.jsonl the role's split
    assert load_questions_file(fx("beir/qrels/train.tsv"), split="eval") == train
    assert load_questions_file(fx("beir/queries.jsonl"), split="train") == train
    assert detect_format(fx("beir/qrels/test.tsv"), "eval") == "beir"
    assert detect_format(fx("beir/corpus.jsonl"), "corpus") == "beir"
    assert load_corpus_file(fx("beir/corpus.jsonl")) == corpus
    # --eval falls back to qrels/dev.tsv; queries without answers are retrieval-only
    ro = load_questions_file(fx("beir-retrieval-only"), split="eval", corpus=corpus)
    assert [(q.id, q.answers, q.positive_ids) for q in ro] == [
        ("q4", [], ["p4"]),
        ("q5", [], ["p5"]),
    ]
    # answers at the top level, a single string
    q = write(tmp_path / "b/queries.jsonl", '{"_id": 1, "text": "t?", "answers": "x"}\n')
    write(tmp_path / "b/qrels/test.tsv", "query-id\tcorpus-id\tscore\n1\tp0\t2\n")
    assert load_questions_file(q, split="eval", corpus_ids={"p0"}) == [
        QAExample("1", "t?", ["x"], ["p0"])
    ]


def test_retrieval_only_cannot_be_trained():
    ro = load_questions_file(fx("beir-retrieval-only"), split="train")
    problem = training_answers_problem("X", ro)
    assert problem.startswith("X: 4 of 4 training questions have no answer (e.g. 'q0')")
    assert "--steps 0" in problem
    assert training_answers_problem("X", load_questions_file(fx("beir"), split="train")) is None


def test_load_dataset_files_defaults(tmp_path):
    ds = load_dataset_files(train=fx("nq-open/train.jsonl"))  # on the embedded corpus
    assert len(ds.corpus) == 800 and len(ds.train) == 4 and len(ds.test) == 100
    empty = write(tmp_path / "c.jsonl", "\n")
    with pytest.raises(ValueError, match=f"{empty}: the corpus is empty"):
        load_dataset_files(empty)


# ------------------------------------------------------------------------------ detection
def test_detection_rules(tmp_path):
    assert DATA_FORMATS == ("auto", "ours", "beir", "dpr", "nq-open", "kilt", "flashrag")
    cases = [
        ("corpus", '{"id": "a", "text": "t"}', "ours"),
        ("corpus", '{"_id": "a", "text": "t"}', "beir"),
        ("corpus", '{"id": "a", "contents": "t"}', "flashrag"),
        ("corpus", '{"_id": "1", "wikipedia_id": "1", "text": ["t"]}', "kilt"),
        ("train", '{"id": "1", "question": "q", "answers": ["a"]}', "ours"),
        ("train", '{"question": "q", "answer": ["a"]}', "nq-open"),
        ("train", '{"id": "1", "input": "q", "output": []}', "kilt"),
        ("train", '{"id": "1", "question": "q", "golden_answers": ["a"]}', "flashrag"),
        ("train", '{"_id": "1", "text": "q"}', "beir"),
        ("train", '\n\n  [{"question": "q", "answers": ["a"]}]', "dpr"),
    ]
    for i, (role, text, fmt) in enumerate(cases):
        path = write(tmp_path / f"f{i}.jsonl", "\n" + text + "\n")
        assert detect_format(path, role) == fmt, (role, text)
    # a UTF-8 byte-order mark; a TSV without a .tsv name; an empty file loads as nothing
    assert detect_format(write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf[{"a": 1}]'), "eval") == "dpr"
    assert detect_format(write(tmp_path / "qa.txt", "q?\t['a']\n"), "eval") == "dpr"
    empty = write(tmp_path / "empty.jsonl", "")
    assert detect_format(empty, "train") == "ours" and load_questions_file(empty) == []


def test_detection_errors_name_the_file(tmp_path):
    unknown = write(tmp_path / "u.jsonl", '{"foo": 1, "bar": 2}\n')
    for role in ("corpus", "train"):
        with pytest.raises(ValueError) as e:
            detect_format(unknown, role)
        assert str(e.value).startswith(f"{unknown}, line 1: cannot tell the format")
        assert "bar, foo" in str(e.value) and "--data-format" in str(e.value)
    with pytest.raises(ValueError, match="looks like a question file, not a corpus"):
        load_corpus_file(fx("ours/train.jsonl"))
    with pytest.raises(ValueError, match="looks like a corpus, not a question file"):
        load_questions_file(fx("ours/corpus.jsonl"))
    with pytest.raises(ValueError, match="a BEIR qrels file, not a corpus"):
        load_corpus_file(fx("beir/qrels/test.tsv"))
    with pytest.raises(ValueError, match="JSON array is a DPR question file, not a corpus"):
        load_corpus_file(fx("dpr/train.json"))
    with pytest.raises(ValueError, match="a TSV corpus needs a header"):
        load_corpus_file(fx("dpr/test.csv"))
    garbage = write(tmp_path / "g.txt", "just words\n")
    with pytest.raises(ValueError, match=r"g\.txt: cannot tell the format.*--data-format"):
        detect_format(garbage, "eval")
    # a malformed first line: the loader's own error, not a detection guess
    bad = write(tmp_path / "b.jsonl", '{"id": "a", \n')
    with pytest.raises(ValueError, match=rf"{bad}, line 1: invalid JSON"):
        detect_format(bad, "corpus")


def test_data_format_overrides_detection(tmp_path):
    # keys "question" and "answers" look like ours (which needs ids); NQ-open reads "answer"
    path = write(tmp_path / "nq.jsonl", '{"question": "q?", "answer": ["a"], "answers": []}\n')
    with pytest.raises(ValueError, match="line 1: missing field 'id'"):
        load_questions_file(path)
    assert load_questions_file(path, data_format="nq-open") == [QAExample("0", "q?", ["a"], [])]
    # an explicit format reads the file as that format, whatever it looks like
    with pytest.raises(ValueError, match=r"eval\.jsonl, line 1: missing field 'golden_answers'"):
        load_questions_file(fx("ours/eval.jsonl"), data_format="flashrag")
    # nq-open has no corpus layout: the corpus is detected
    assert load_corpus_file(fx("dpr/psgs.tsv"), data_format="nq-open")[0].id == "1"
    with pytest.raises(ValueError, match="is a directory; --data-format dpr reads files"):
        load_corpus_file(fx("beir"), data_format="dpr")
    with pytest.raises(ValueError, match="data_format must be one of"):
        load_corpus_file(fx("beir"), data_format="csv")


# ------------------------------------------------------------------------------ malformed records
def _beir_copy(tmp_path, **replace) -> str:
    d = tmp_path / "beir"
    shutil.copytree(fx("beir"), d)
    for name, text in replace.items():
        write(d / name.replace("__", "/"), text)
    return str(d)


MALFORMED = [
    # (id, files {name: text}, loader, error suffix after "<file>, line <n>: ")
    ("ours-corpus", {"c.jsonl": '{"id": "a", "text": "t"}\n{"id": "b", "text": \n'}, "corpus",
     ("c.jsonl", 2, "invalid JSON")),
    ("beir-corpus", {"corpus.jsonl": '{"_id": "a", "text": "t"}\n\n{"title": "x", "text": "y"}\n'},
     "corpus", ("corpus.jsonl", 3, "missing field '_id'")),
    ("dpr-passages", {"p.tsv": "id\ttext\ttitle\n1\tt\tT\n2\tonly two\n"}, "corpus",
     ("p.tsv", 3, "expected 3 tab-separated columns")),
    ("dpr-passages-dup", {"p.tsv": "id\ttext\ttitle\n1\tt\tT\n1\tu\tU\n"}, "corpus",
     ("p.tsv", 3, "duplicate id '1' (first on line 2)")),
    ("dpr-passages-utf8", {"p.tsv": b"id\ttext\ttitle\n1\tt\tT\n2\t\xff\tU\n"}, "corpus",
     ("p.tsv", 3, "not valid UTF-8 (byte 0xff at column 3)")),
    ("kilt-corpus", {"k.jsonl": '{"wikipedia_id": "1", "text": ["a"]}\n{"wikipedia_id": "2", '
                     '"text": 5}\n'}, "corpus", ("k.jsonl", 2, "field 'text' must be a list")),
    ("flashrag-corpus", {"f.jsonl": '{"id": 1, "contents": "T\\nx"}\n{"id": 2}\n'}, "corpus",
     ("f.jsonl", 2, "missing field 'contents'")),
    ("dpr-json-field", {"d.json": '[\n  {"question": "a?", "answers": ["x"]},\n  {"question": '
                        '"b?"}\n]\n'}, "train", ("d.json", 3, "missing field 'answers'")),
    ("dpr-json-syntax", {"d.json": '[\n  {"question": "a?",\n   "answers": ["x"]},\n  {"question":'
                         ' "b?", "answers": ["y"] "z": 1}\n]\n'}, "train",
     ("d.json", 4, "invalid JSON (Expecting ',' delimiter)")),
    ("dpr-json-truncated", {"d.json": '[\n  {"question": "a?", "answers": ["x"]},\n'}, "train",
     ("d.json", 3, "the file ends inside the JSON array")),
    ("dpr-json-trailing", {"d.json": '[{"question": "a?", "answers": ["x"]}]\n\n{}\n'}, "train",
     ("d.json", 3, "data after the end of the JSON array")),
    ("dpr-json-utf8", {"d.json": b'[\n{"question": "a?", "answers": ["x"]},\n{"question": "\xc3(",'
                       b' "answers": ["y"]}]'}, "train", ("d.json", 3, "not valid UTF-8")),
    ("dpr-json-not-object", {"d.json": "[1, 2]\n"}, "train",
     ("d.json", 1, "expected a JSON object (a DPR question), got int")),
    ("dpr-qa", {"qa.csv": "q1?\t['a']\nq2?\tnot a list\n"}, "eval",
     ("qa.csv", 2, "the answers column must be a non-empty list of strings")),
    ("dpr-qa-columns", {"qa.csv": "q1?\t['a']\n\nq2?\t['b']\textra\n"}, "eval",
     ("qa.csv", 3, "expected 2 columns")),
    ("nq-open", {"n.jsonl": '{"question": "q", "answer": ["a"]}\n{"question": "r", "answer": []}\n'},
     "eval", ("n.jsonl", 2, "field 'answer' must not be empty")),
    ("kilt", {"k.jsonl": '{"id": 1, "input": "q", "output": [{"answer": "a"}]}\n'
              '{"id": 2, "input": "r", "output": {"answer": "b"}}\n'}, "eval",
     ("k.jsonl", 2, "field 'output' must be a list")),
    ("kilt-no-answer", {"k.jsonl": '{"id": 1, "input": "q", "output": [{"provenance": []}]}\n'},
     "eval", ("k.jsonl", 1, "no 'answer' in output")),
    ("flashrag", {"f.jsonl": '{"id": 1, "question": "q", "golden_answers": ["a"]}\n'
                  '{"id": 2, "question": "r", "golden_answers": "b"}\n{"id": 2, "question": "s",'
                  ' "golden_answers": ["c"]}\n'}, "eval", ("f.jsonl", 3, "duplicate id '2'")),
]  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_records_name_file_and_line(tmp_path, case):
    _, files, role, (name, line, what) = case
    for fname, text in files.items():
        write(tmp_path / fname, text)
    path = str(tmp_path / name)
    with pytest.raises(ValueError) as e:
        if role == "corpus":
            load_corpus_file(path)
        else:
            load_questions_file(path, split=role)
    assert str(e.value).startswith(f"{path}, line {line}: {what}"), str(e.value)


BEIR_MALFORMED = [
    ("queries.jsonl", '{"_id": "q0", "text": "a?"}\n{"_id": "q1"}\n', "queries.jsonl", 2,
     "missing field 'text'"),
    ("qrels__train.tsv", "query-id\tcorpus-id\tscore\nq0\tp0\t1\nq1\tp1\n", "qrels/train.tsv", 3,
     "expected 3 tab-separated columns"),
    ("qrels__train.tsv", "query-id\tcorpus-id\tscore\nq0\tp0\thigh\n", "qrels/train.tsv", 2,
     "score must be a number"),
    ("qrels__train.tsv", "q0\tp0\t1\n", "qrels/train.tsv", 1, "expected the header"),
    ("qrels__train.tsv", "query-id\tcorpus-id\tscore\nq0\tp0\t1\nq99\tp1\t1\n",
     "qrels/train.tsv", 3, "query-id 'q99' is not in"),
]  # fmt: skip


@pytest.mark.parametrize("name, text, where, line, what", BEIR_MALFORMED)
def test_beir_malformed(tmp_path, name, text, where, line, what):
    d = _beir_copy(tmp_path, **{name: text})
    with pytest.raises(ValueError) as e:
        load_questions_file(d, split="train", corpus_ids={f"p{i}" for i in range(6)})
    assert str(e.value).startswith(f"{os.path.join(d, where)}, line {line}: {what}"), e.value


# ------------------------------------------------------------------------------ gold passages
def test_gold_passages_not_in_the_corpus(tmp_path, capsys):
    ids = {f"p{i}" for i in range(6)}
    qrels = "query-id\tcorpus-id\tscore\nq4\tp4\t1\nq4\tp99\t1\nq5\tp5\t1\n"
    d = _beir_copy(tmp_path, **{"qrels__test.tsv": qrels})
    qs = load_questions_file(d, split="eval", corpus_ids=ids)
    assert [q.positive_ids for q in qs] == [["p4"], ["p5"]]
    err = capsys.readouterr().err
    assert "1 of 3 gold passages are not in the corpus (first: line 3, 'p99')" in err
    # none of them in the corpus: the wrong corpus
    with pytest.raises(ValueError, match="none of the 2 gold passages is in the corpus"):
        load_questions_file(fx("beir"), split="eval", corpus_ids={"x"})
    with pytest.raises(ValueError, match="none of the 4 gold passages is in the corpus"):
        load_questions_file(fx("dpr/train.json"), corpus=[Passage("x", "T", "other text")])
    # KILT provenance that names no corpus passage: kept without gold passages, with a warning
    kilt = load_questions_file(fx("kilt/dev.jsonl"), split="eval", corpus_ids=ids)
    assert [q.positive_ids for q in kilt] == [[], []]
    assert "no gold passage id is a corpus id" in capsys.readouterr().err


# ------------------------------------------------------------------------------ streaming
def test_json_array_streams_element_by_element(tmp_path):
    records = [
        {"question": f'q{i} é 日本 \\u " ', "answers": [str(i)], "n": i * 1.5, "b": [True, None]}
        for i in range(40)
    ]
    path = write(tmp_path / "a.json", json.dumps(records, indent=3, ensure_ascii=False))
    starts = [i for i, ln in enumerate(open(path, encoding="utf-8"), start=1) if ln == "   {\n"]
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        got = list(iter_json_array(path, chunk_size=chunk))
        assert [o for _, o in got] == records, chunk
        assert [ln for ln, _ in got] == starts, chunk
    assert list(iter_json_array(write(tmp_path / "e.json", " [ ] "))) == []
    # the first element comes before the rest of the file is read
    big = write(tmp_path / "big.json", '[{"a": 1},\n' + "x" * (3 << 20))
    it = iter_json_array(big)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(ValueError, match=r"big\.json, line 2: invalid JSON"):
        next(it)


# ------------------------------------------------------------------------------ configuration
def test_data_format_option_and_paths(tmp_path):
    assert TrainConfig().data_format == "auto"
    assert data_path_problem(fx("beir"), "corpus") is None
    assert data_path_problem(fx("beir"), "train") is None
    assert data_path_problem(fx("beir-retrieval-only"), "eval") is None  # qrels/dev.tsv
    assert data_path_problem(str(tmp_path), "corpus").startswith(
        "is a directory without corpus.jsonl"
    )
    d = _beir_copy(tmp_path)
    os.remove(os.path.join(d, "qrels", "train.tsv"))
    assert data_path_problem(d, "train").startswith(
        "is a BEIR folder without qrels/train.tsv for --train (it has qrels/test.tsv)"
    )
    assert data_path_problem(fx("beir"), "corpus", "kilt").startswith("is a directory;")
    assert data_path_problem(str(tmp_path / "nope"), "eval") == "no such file"
    # the format is how paths are read: resuming with another --data-format is free (the data
    # are compared by content), as is a checkpoint written before the option existed
    old, new = TrainConfig().to_dict(), TrainConfig(data_format="beir").to_dict()
    assert resume_differences(old, new, {}, {}) == ([], [])
    del old["data_format"]
    assert resume_differences(old, new, {}, {}) == ([], [])


def test_cli_data_errors(no_models, capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "out")]
    line = run_cli_error(capsys, "train", *TINY, "--data-format", "csv", *out)
    assert "--data-format" in line and "invalid choice" in line
    line = run_cli_error(capsys, "train", *TINY, "--corpus", str(tmp_path), *out)
    assert f"--corpus {tmp_path}: is a directory without corpus.jsonl" in line
    line = run_cli_error(
        capsys, "train", *TINY, "--data-format", "dpr", "--corpus", fx("beir"), *out
    )
    assert f"--corpus {fx('beir')}: is a directory; --data-format dpr reads files" in line
    bad = write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n1\tt\tT\n2\tx\n")
    line = run_cli_error(capsys, "train", *TINY, "--corpus", bad, *out)
    assert f"{bad}, line 3: expected 3 tab-separated columns" in line
    ro = fx("beir-retrieval-only")
    line = run_cli_error(capsys, "train", *TINY, "--corpus", ro, "--train", ro, "--eval", ro, *out)
    assert f"{ro}: 4 of 4 training questions have no answer" in line


# ------------------------------------------------------------------------------ end to end
FAST = ["--progress", "false", "--max-new-tokens", "2", "--docs", "2", "--batch-size", "2"]


@pytest.mark.parametrize("fmt", list(RUNS))
def test_train_and_eval_each_format(fmt, tmp_path, capsys):
    corpus, train, eval_ = paths(fmt)
    out = str(tmp_path / "run")
    argv = ["--corpus", corpus, "--train", train, "--eval", eval_, "--output-dir", out]
    rc = main(["train", "--steps", "2", *TINY, *argv, "--skip-initial-eval", *FAST])
    assert rc == 0, capsys.readouterr().err
    rc = main(["eval", "--output-dir", out, "--resume", "--progress", "false"])
    assert rc == 0, capsys.readouterr().err
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert json.load(open(os.path.join(out, "config.json")))["data_format"] == "auto"
    for key in ("final", "eval"):
        m = metrics[key]
        assert m["n"] == 2 and m["em"] is not None
        has_gold = GOLD[fmt] and fmt != "dpr"  # the DPR QA file names no gold passage
        assert (m["recall@1"] is not None) == has_gold, (key, m)


def test_retrieval_only_evaluation(tmp_path, capsys):
    ro = fx("beir-retrieval-only")
    out = str(tmp_path / "run")
    argv = ["--corpus", ro, "--eval", ro, "--output-dir", out]
    assert main(["train", "--steps", "0", *TINY, *argv, *FAST]) == 0, capsys.readouterr().err
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["final"]
    assert m["recall@1"] is not None and m["em"] is None and m["n"] == 2


def test_resume_compares_local_model_directories_by_location(tmp_path, monkeypatch):
    """Runs save local model directories absolute; a checkpoint that recorded one relative to
    the working directory resumes from there without a spurious --generator difference."""
    (tmp_path / "gen").mkdir()
    monkeypatch.chdir(tmp_path)
    old = TrainConfig(generator="gen").to_dict()
    new = TrainConfig(generator=str(tmp_path / "gen")).to_dict()
    assert resume_differences(old, new, {}, {}) == ([], [])
    other = TrainConfig(generator=str(tmp_path)).to_dict()
    unsafe, _ = resume_differences(old, other, {}, {})
    assert any(t.startswith("--generator gen → ") for t in unsafe), unsafe
