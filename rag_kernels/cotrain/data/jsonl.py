"""Data schema (passages, question-answer examples, a data set) and JSONL input/output.

File formats, one JSON object per line (blank lines are skipped, unknown keys ignored):

* corpus: ``{"id": str, "title": str (optional), "text": str}``
* QA: ``{"id": str, "question": str, "answers": [str, ...], "positive_ids": [str, ...]}``
  with ``positive_ids`` optional (the ids of the gold passages; used for retrieval metrics
  and supervised retriever objectives).

A malformed line (invalid UTF-8, invalid JSON, not an object, a missing or ill-typed field,
an empty ``text``/``question``/``answers``, a duplicate id, a positive id missing from a given
corpus) raises ``ValueError("<path>, line <n>: <what is wrong>")``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

__all__ = [
    "Passage",
    "QAExample",
    "Dataset",
    "read_jsonl",
    "write_jsonl",
    "load_corpus",
    "load_qa",
    "write_corpus",
    "write_qa",
]


@dataclass(frozen=True)
class Passage:
    """One retrievable document."""

    id: str
    title: str
    text: str


@dataclass
class QAExample:
    """A question, its reference answers and the ids of its gold passages. ``answers`` has at
    least one answer, except for retrieval-only data (BEIR queries without answers, see
    :mod:`.formats`): such questions can be evaluated (retrieval metrics) but not trained on."""

    id: str
    question: str
    answers: list[str]
    positive_ids: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    """A corpus and question splits; every split may be empty."""

    corpus: list[Passage]
    train: list[QAExample]
    dev: list[QAExample]
    test: list[QAExample]

    SPLITS = ("train", "dev", "test")

    def passage_index(self) -> dict[str, Passage]:
        """Map passage id -> passage."""
        return {p.id: p for p in self.corpus}

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``corpus.jsonl``, ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` to ``directory``
        (created if missing); :meth:`load` reads them back."""
        os.makedirs(directory, exist_ok=True)
        write_corpus(os.path.join(directory, "corpus.jsonl"), self.corpus)
        for split in self.SPLITS:
            write_qa(os.path.join(directory, f"{split}.jsonl"), getattr(self, split))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Dataset:
        """Read a directory written by :meth:`save`. ``corpus.jsonl`` is required; a missing
        split file gives an empty split. Positive ids are checked against the corpus."""
        corpus = load_corpus(os.path.join(directory, "corpus.jsonl"))
        ids = {p.id for p in corpus}
        splits = {}
        for split in cls.SPLITS:
            path = os.path.join(directory, f"{split}.jsonl")
            splits[split] = load_qa(path, corpus_ids=ids) if os.path.exists(path) else []
        return cls(corpus=corpus, **splits)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line (numbers start at 1).
    Raises ``ValueError`` naming the file and line for invalid UTF-8, invalid JSON or a
    non-object line (a UTF-8 byte-order mark at the start is skipped)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                    f"column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(
                    f"{path}, line {lineno}: invalid JSON (nested too deeply to parse)"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_corpus(path: str | os.PathLike, passages: Iterable[Passage]) -> None:
    write_jsonl(path, (asdict(p) for p in passages))


def write_qa(path: str | os.PathLike, examples: Iterable[QAExample]) -> None:
    write_jsonl(path, (asdict(e) for e in examples))


def _where(path, lineno) -> str:
    return f"{path}, line {lineno}"


def _get_str(obj: dict, key: str, where: str, *, required: bool = True, nonempty: bool = True):
    if key not in obj:
        if required:
            raise ValueError(f"{where}: missing field {key!r}")
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if nonempty and not v.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return v


def _get_str_list(obj: dict, key: str, where: str, *, required: bool, nonempty: bool):
    if key not in obj:
        if required:
            raise ValueError(f"{where}: missing field {key!r}")
        return []
    v = obj[key]
    if not isinstance(v, list):
        raise ValueError(
            f"{where}: field {key!r} must be a list of strings, got {type(v).__name__}"
        )
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(
                f"{where}: field {key!r} must hold non-empty strings, item {i} is {item!r}"
            )
    if nonempty and not v:
        raise ValueError(f"{where}: field {key!r} must not be empty")
    return list(v)


def load_corpus(path: str | os.PathLike) -> list[Passage]:
    """Read a corpus JSONL file: lines ``{"id", "title" (optional, default ""), "text"}``."""
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        where = _where(path, lineno)
        pid = _get_str(obj, "id", where)
        title = _get_str(obj, "title", where, required=False, nonempty=False) or ""
        text = _get_str(obj, "text", where)
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        passages.append(Passage(id=pid, title=title, text=text))
    return passages


def load_qa(path: str | os.PathLike, *, corpus_ids: Iterable[str] | None = None) -> list[QAExample]:
    """Read a QA JSONL file: lines ``{"id", "question", "answers": [...], "positive_ids": [...]}``
    (``positive_ids`` optional). With ``corpus_ids``, every positive id must be one of them."""
    known = set(corpus_ids) if corpus_ids is not None else None
    examples: list[QAExample] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        where = _where(path, lineno)
        qid = _get_str(obj, "id", where)
        question = _get_str(obj, "question", where)
        answers = _get_str_list(obj, "answers", where, required=True, nonempty=True)
        positives = _get_str_list(obj, "positive_ids", where, required=False, nonempty=False)
        if qid in seen:
            raise ValueError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]})")
        if known is not None:
            missing = [p for p in positives if p not in known]
            if missing:
                raise ValueError(f"{where}: positive_ids not in the corpus: {missing[:5]!r}")
        seen[qid] = lineno
        examples.append(QAExample(qid, question, answers, positives))
    return examples
