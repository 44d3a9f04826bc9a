"""Reading the common RAG data formats: ours, BEIR, DPR, NQ-open, KILT and FlashRAG.

Every loader streams: a file is read line by line (a DPR JSON array element by element) and
each record becomes a :class:`~.jsonl.Passage` / :class:`~.jsonl.QAExample` at once, so a
corpus of millions of lines is never held as parsed JSON. A malformed record raises
``ValueError("<path>, line <n>: <what is wrong>")`` (the line where the record starts).

Formats (``--data-format``; ``auto`` detects each file on its own, see :func:`detect_format`):

======== ============================================= ==========================================
format   corpus                                        questions (``--train``/``--dev``/``--eval``)
======== ============================================= ==========================================
ours     JSONL ``{id, title?, text}``                  JSONL ``{id, question, answers,
                                                       positive_ids?}``
beir     a BEIR folder or its ``corpus.jsonl``         the folder (``qrels/train.tsv`` for
         ``{_id, title?, text}``                       ``--train``, ``qrels/dev.tsv`` for
                                                       ``--dev``, ``qrels/test.tsv`` else
                                                       ``qrels/dev.tsv`` for ``--eval``), its
                                                       ``queries.jsonl`` or a ``qrels/*.tsv``
dpr      TSV ``id<TAB>text<TAB>title`` with header     JSON array ``[{question, answers,
         (``psgs_w100.tsv``)                           positive_ctxs, ...}]`` (or one such
                                                       object per line), or TSV/CSV
                                                       ``question<TAB>['answer', ...]``
nq-open  (none: the corpus is auto-detected)           JSONL ``{question, answer: [...]}``
kilt     knowledge source JSONL ``{wikipedia_id,       JSONL ``{id, input, output: [{answer,
         wikipedia_title, text: [paragraphs]}``        provenance: [{wikipedia_id}]}]}``
flashrag JSONL ``{id, contents: "title\\ntext"}``       JSONL ``{id, question, golden_answers}``
======== ============================================= ==========================================

Gold passages (``positive_ids``): ours ``positive_ids`` (each must be a corpus id); BEIR
qrels rows with ``score > 0``; DPR ``positive_ctxs`` by ``passage_id``, else by their exact
(title, text) in the corpus; KILT provenance ``wikipedia_id`` where the corpus has that id.
For BEIR and DPR a positive that is not in the corpus is dropped with a warning, and none of
them being in the corpus is an error (the wrong corpus); for KILT unmatched provenance is
dropped (a warning when none matches: the corpus is then not keyed by ``wikipedia_id``).
NQ-open, FlashRAG and DPR QA TSV have no gold passages: retrieval metrics stay ``None``.

Retrieval-only data: BEIR queries have no answers unless a query carries ``answers`` or
``metadata.answer``/``metadata.answers``; such questions get ``answers=[]``. They can be
evaluated (retrieval metrics), not trained on: :func:`training_answers_problem`.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections.abc import Iterator, Sequence

from ..errors import warn
from .jsonl import Dataset, Passage, QAExample, _get_str, _get_str_list, load_corpus, load_qa
from .jsonl import read_jsonl as _read_jsonl
from .synthetic import load_default

__all__ = [
    "DATA_FORMATS",
    "FORMATS",
    "data_path_problem",
    "detect_format",
    "iter_json_array",
    "load_corpus_file",
    "load_dataset_files",
    "load_questions_file",
    "training_answers_problem",
]

FORMATS = ("ours", "beir", "dpr", "nq-open", "kilt", "flashrag")
DATA_FORMATS = ("auto", *FORMATS)
_ROLES = ("corpus", "train", "dev", "eval")
_HINT = "pass --data-format (" + ", ".join(FORMATS) + ")"
_BEIR_LAYOUT = "a BEIR folder has corpus.jsonl, queries.jsonl and qrels/<split>.tsv"


def _where(path, lineno) -> str:
    return f"{path}, line {lineno}"


# ------------------------------------------------------------------------------ low-level reading
def _decoded_lines(path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of every line, newline included (a BOM on line 1 dropped);
    invalid UTF-8 raises ``ValueError`` naming the line and column."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{_where(path, lineno)}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                    f"column {e.start + 1})"
                ) from None


def _tsv_rows(path, delimiter: str = "\t") -> Iterator[tuple[int, list[str]]]:
    """``(line where the row starts, fields)`` of a TSV/CSV file read with :mod:`csv` (quoted
    fields, as in DPR's files, may hold tabs and newlines); blank lines are skipped."""
    state = {"line": 0}

    def lines():
        for lineno, text in _decoded_lines(path):
            state["line"] = lineno
            yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{_where(path, state['line'])}: malformed TSV/CSV ({e})") from None
        if row and any(field.strip() for field in row):
            yield start, row
        start = state["line"] + 1


_CHUNK = 1 << 20


def iter_json_array(path, *, chunk_size: int = _CHUNK) -> Iterator[tuple[int, object]]:
    """Stream the elements of a file holding one JSON array: ``(line where the element
    starts, element)``, one element in memory at a time (plus one read chunk). Invalid UTF-8,
    invalid JSON, a missing ``[`` or ``]`` and data after the array raise ``ValueError``
    naming the line."""
    dec = json.JSONDecoder()
    with open(path, "rb") as f:
        buf = ""  # decoded text not consumed yet
        mark, mark_line = 0, 1  # an index into buf and its line number (counted onwards)
        pos = 0
        eof = False
        pending = b""  # an incomplete UTF-8 sequence at the end of the last chunk
        seen_nl = 0  # newlines in the bytes decoded so far (for UTF-8 error lines)
        col = 0  # bytes since the last newline decoded so far
        first = True

        def more() -> bool:
            nonlocal buf, mark, mark_line, pos, eof, pending, seen_nl, col, first
            if eof:
                return False
            if pos > chunk_size:  # drop what was consumed
                mark_line, mark = line_at(pos), 0
                buf, pos = buf[pos:], 0
            chunk = f.read(chunk_size)
            if not chunk:
                eof = True
                if pending:
                    raise ValueError(
                        f"{_where(path, seen_nl + 1)}: not valid UTF-8 (the file ends inside a "
                        "multi-byte character)"
                    )
                return False
            data = pending + chunk
            try:
                text = data.decode("utf-8")
                pending = b""
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and e.start >= len(data) - 3:
                    text, pending = data[: e.start].decode("utf-8"), data[e.start :]
                else:
                    nl = data.rfind(b"\n", 0, e.start)
                    line = seen_nl + data.count(b"\n", 0, e.start) + 1
                    column = (e.start - nl) if nl >= 0 else (col + e.start + 1)
                    raise ValueError(
                        f"{_where(path, line)}: not valid UTF-8 (byte 0x{data[e.start]:02x} "
                        f"at column {column})"
                    ) from None
            decoded = data[: len(data) - len(pending)]
            seen_nl += decoded.count(b"\n")
            nl = decoded.rfind(b"\n")
            col = len(decoded) - nl - 1 if nl >= 0 else col + len(decoded)
            if first:
                text = text.removeprefix("\ufeff")
                first = False
            buf += text
            return True

        def line_at(i: int) -> int:
            nonlocal mark, mark_line
            if i >= mark:
                mark_line += buf.count("\n", mark, i)
            else:
                mark_line -= buf.count("\n", i, mark)
            mark = i
            return mark_line

        def skip_ws() -> bool:
            """Move ``pos`` to the next non-whitespace character; False at the end of file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return True
                if not more():
                    return False

        if not skip_ws():
            return  # an empty file: no elements
        if buf[pos] != "[":
            raise ValueError(
                f"{_where(path, line_at(pos))}: expected a JSON array ('['), got {buf[pos]!r}"
            )
        pos += 1
        n = 0
        while True:
            if not skip_ws():
                raise ValueError(
                    f"{_where(path, line_at(pos))}: the file ends inside the JSON array "
                    "(truncated? no closing ']')"
                )
            c = buf[pos]
            if c == "]":
                pos += 1
                if skip_ws():
                    raise ValueError(
                        f"{_where(path, line_at(pos))}: data after the end of the JSON array"
                    )
                return
            if n:
                if c != ",":
                    raise ValueError(
                        f"{_where(path, line_at(pos))}: invalid JSON (expected ',' or ']' "
                        "after an element)"
                    )
                pos += 1
                if not skip_ws():
                    continue  # reported above
                if buf[pos] == "]":
                    raise ValueError(
                        f"{_where(path, line_at(pos))}: invalid JSON (a ',' before ']')"
                    )
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    maybe_cut = e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated string")
                    if maybe_cut and more():
                        continue
                    raise ValueError(
                        f"{_where(path, line_at(e.pos))}: invalid JSON ({e.msg})"
                    ) from None
                except RecursionError:
                    raise ValueError(
                        f"{_where(path, line_at(pos))}: invalid JSON (nested too deeply to parse)"
                    ) from None
                if end >= len(buf) and more():  # a number or literal may go on
                    continue
                break
            yield line_at(pos), obj
            pos = end
            n += 1


def _first_char(path) -> str:
    """The first non-whitespace character of a file (after a UTF-8 BOM) if it is ASCII,
    ``"?"`` if it is not, ``""`` for a blank file. Reads only up to that character."""
    with open(path, "rb") as f:
        head = f.read(3)
        head = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
        while True:
            rest = head.lstrip(b" \t\r\n")
            if rest:
                return chr(rest[0]) if rest[0] < 128 else "?"
            head = f.read(4096)
            if not head:
                return ""


def _first_object(path) -> tuple[int, dict] | None:
    """The first non-blank line of a JSONL file as ``(line, object)`` (None: empty file);
    the errors of :func:`~.jsonl.read_jsonl`."""
    for lineno, obj in _read_jsonl(path):
        return lineno, obj
    return None


def _first_line(path) -> str | None:
    """The first non-blank line of a text file, without its newline (None: blank file)."""
    for _, text in _decoded_lines(path):
        if text.strip():
            return text.rstrip("\r\n")
    return None


def _first_row(path) -> list[str] | None:
    """The first non-blank line of a TSV/CSV file, split at tabs (else commas)."""
    line = _first_line(path)
    if line is None:
        return None
    return line.split("\t") if "\t" in line else line.split(",")


_QRELS_HEADER = ["query-id", "corpus-id", "score"]


def _is_qrels_header(row) -> bool:
    return [c.strip().lower() for c in row[:3]] == _QRELS_HEADER


def _is_passages_header(row) -> bool:
    cols = [c.strip().lower() for c in row]
    return "id" in cols and "text" in cols


# ------------------------------------------------------------------------------ detection
def _check_role(role: str) -> str:
    if role not in _ROLES:
        raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
    return role


def _keys(obj: dict) -> str:
    return ", ".join(sorted(obj)[:8]) or "none"


def detect_format(path, role: str = "corpus") -> str:
    """The format (one of :data:`FORMATS`) of a ``role`` file (``corpus``, ``train``, ``dev``
    or ``eval``), from the path and the content:

    * a directory: ``beir``;
    * ``.tsv`` / ``.csv``: a ``query-id corpus-id score`` header is BEIR qrels, an ``id ...
      text ...`` header DPR passages (corpus), anything else a DPR QA file (questions);
    * a first non-blank character ``[``: a DPR JSON array;
    * else the keys of the first non-blank JSON line — corpus: ``wikipedia_id`` kilt,
      ``_id`` beir, ``contents`` flashrag, ``id``+``text`` ours; questions: ``input`` kilt,
      ``golden_answers`` flashrag, ``positive_ctxs`` dpr, ``_id``+``text`` beir,
      ``question``+``answers`` ours, ``question``+``answer`` nq-open.

    An empty file is ``ours`` (it loads as nothing). A malformed first line raises the
    loader's ``ValueError`` (``<path>, line <n>: ...``); keys that fit no format raise a
    ``ValueError`` naming the file and suggesting ``--data-format``."""
    role = _check_role(role)
    questions = role != "corpus"
    what = "question file" if questions else "corpus file"
    if os.path.isdir(path):
        return "beir"
    low = str(path).lower()
    first = _first_char(path)
    if not first:
        return "ours"
    tabular = low.endswith((".tsv", ".csv"))
    if not tabular and first not in "[{" and not low.endswith((".jsonl", ".json")):
        line = _first_line(path) or ""
        if "\t" not in line:
            raise ValueError(
                f"{path}: cannot tell the format of this {what}: its first line is neither "
                f"JSON nor tab-separated (starts with {line[:20]!r}); {_HINT}"
            )
        tabular = True  # a TSV file without a .tsv name
    if tabular:
        row = _first_row(path)
        if _is_qrels_header(row):
            if not questions:
                raise ValueError(
                    f"{path}: a BEIR qrels file, not a corpus (pass the BEIR folder or its "
                    "corpus.jsonl as --corpus)"
                )
            return "beir"
        if not questions:
            if _is_passages_header(row):
                return "dpr"
            raise ValueError(
                f"{path}: cannot tell the format of this {what}: a TSV corpus needs a header "
                f"'id<TAB>text<TAB>title' (DPR), got {row[:3]!r}; {_HINT}"
            )
        return "dpr"
    if first == "[":
        if not questions:
            raise ValueError(
                f"{path}: a JSON array is a DPR question file, not a corpus (a DPR corpus is "
                "a TSV file id<TAB>text<TAB>title)"
            )
        return "dpr"
    found = _first_object(path)
    if found is None:
        return "ours"
    lineno, obj = found
    keys = set(obj)
    if not questions:
        if "wikipedia_id" in keys:
            return "kilt"
        if "_id" in keys:
            return "beir"
        if "contents" in keys:
            return "flashrag"
        if "id" in keys and "text" in keys:
            return "ours"
        if keys & {"question", "input", "query", "golden_answers"}:
            raise ValueError(
                f"{_where(path, lineno)}: this looks like a question file, not a corpus "
                f"(keys: {_keys(obj)})"
            )
    else:
        if "input" in keys:
            return "kilt"
        if "golden_answers" in keys:
            return "flashrag"
        if "positive_ctxs" in keys:
            return "dpr"
        if "_id" in keys and "text" in keys:
            return "beir"
        if "question" in keys and "answers" in keys:
            return "ours"
        if "question" in keys and "answer" in keys:
            return "nq-open"
        if "contents" in keys or ("text" in keys and "question" not in keys):
            raise ValueError(
                f"{_where(path, lineno)}: this looks like a corpus, not a question file "
                f"(keys: {_keys(obj)})"
            )
    raise ValueError(
        f"{_where(path, lineno)}: cannot tell the format of this {what} from its keys "
        f"({_keys(obj)}); {_HINT}"
    )


def _resolve(path, role: str, data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}"
        )
    if role == "corpus" and data_format == "nq-open":
        data_format = "auto"  # NQ-open has no corpus file of its own
    if data_format == "auto":
        return detect_format(path, role)
    if os.path.isdir(path) and data_format != "beir":
        raise ValueError(
            f"{path}: is a directory; --data-format {data_format} reads files (a directory "
            "is read as a BEIR folder)"
        )
    return data_format


def data_path_problem(path: str, role: str, data_format: str = "auto") -> str | None:
    """What is wrong with the path of a ``role`` data file before anything is read (None when
    it is fine): missing, unreadable, or a directory that is not a BEIR folder (for
    ``train`` it needs ``qrels/train.tsv``, for ``dev`` ``qrels/dev.tsv``, for ``eval``
    ``qrels/test.tsv`` or ``dev.tsv``).
    Cheap: it reads no file."""
    role = _check_role(role)
    if not str(path).strip():
        return "must not be empty"
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        if data_format not in ("auto", "beir"):
            return (
                f"is a directory; --data-format {data_format} reads files (only a BEIR folder "
                "can be a directory)"
            )
        need = "corpus.jsonl" if role == "corpus" else "queries.jsonl"
        if not os.path.isfile(os.path.join(path, need)):
            return f"is a directory without {need}; expected a data file, or {_BEIR_LAYOUT}"
        if role != "corpus":
            return _find_qrels(path, role)[1]
        return None
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


# ------------------------------------------------------------------------------ field helpers
def _get_id(obj: dict, key: str, where: str) -> str:
    """A string or integer id (BEIR/DPR/KILT/FlashRAG write both) as a non-empty string."""
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{where}: field {key!r} must be a string or an integer, got {v!r}")
    v = str(v)
    if not v.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return v


def _answers(v, key: str, where: str) -> list[str]:
    """A list of non-empty strings (a single string is one answer)."""
    if isinstance(v, str):
        v = [v]
    return _get_str_list({key: v}, key, where, required=True, nonempty=False)


class _Ids:
    """Unique ids: ``add`` raises on a duplicate, naming the line of the first one. A set of
    ids (not id -> line: a corpus may have millions); the first line of a duplicate is found
    by ``rescan()`` (``(line, id)`` of the file's records again), on that error only."""

    def __init__(self, rescan) -> None:
        self.seen: set[str] = set()
        self._rescan = rescan

    def add(self, pid: str, where: str, lineno: int) -> None:
        if pid in self.seen:
            first = next((ln for ln, other in self._rescan() if other == pid), None)
            on = f"line {first}" if first is not None and first < lineno else "an earlier line"
            raise ValueError(f"{where}: duplicate id {pid!r} (first on {on})")
        self.seen.add(pid)


def _jsonl_ids(path, key: str):
    """``rescan`` of :class:`_Ids` for a JSONL file whose records have their id at ``key``."""

    def rescan():
        for lineno, obj in _read_jsonl(path):
            v = obj.get(key)
            if isinstance(v, (str, int)) and not isinstance(v, bool):
                yield lineno, str(v)

    return rescan


# ------------------------------------------------------------------------------ corpus loaders
def _beir_corpus(path) -> list[Passage]:
    if os.path.isdir(path):
        path = os.path.join(path, "corpus.jsonl")
    out: list[Passage] = []
    ids = _Ids(_jsonl_ids(path, "_id"))
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        pid = _get_id(obj, "_id", where)
        title = _get_str(obj, "title", where, required=False, nonempty=False) or ""
        text = _get_str(obj, "text", where, nonempty=False)
        if not text.strip() and not title.strip():
            raise ValueError(f"{where}: both 'title' and 'text' are empty")
        ids.add(pid, where, lineno)
        out.append(Passage(pid, title, text))
    return out


def _dpr_passages(path) -> list[Passage]:
    out: list[Passage] = []
    state: dict = {}

    def rescan():
        for lineno, row in _tsv_rows(path):
            if lineno > state["header"] and len(row) > state["id"]:
                yield lineno, row[state["id"]].strip()

    ids = _Ids(rescan)
    cols = None
    for lineno, row in _tsv_rows(path):
        where = _where(path, lineno)
        if cols is None:
            header = [c.strip().lower() for c in row]
            if not _is_passages_header(row):
                raise ValueError(
                    f"{where}: expected the header 'id<TAB>text<TAB>title' of a DPR passages "
                    f"file, got {row[:3]!r}"
                )
            title_col = header.index("title") if "title" in header else -1
            cols = (header.index("id"), header.index("text"), title_col)
            state.update(header=lineno, id=cols[0])
            width = len(header)
            continue
        if len(row) != width:
            raise ValueError(
                f"{where}: expected {width} tab-separated columns (as the header), got {len(row)}"
            )
        pid, text = row[cols[0]].strip(), row[cols[1]]
        title = row[cols[2]] if cols[2] >= 0 else ""
        if not pid:
            raise ValueError(f"{where}: empty id")
        if not text.strip():
            raise ValueError(f"{where}: empty text")
        ids.add(pid, where, lineno)
        out.append(Passage(pid, title, text))
    return out


def _kilt_corpus(path) -> list[Passage]:
    out: list[Passage] = []
    ids = _Ids(_jsonl_ids(path, "wikipedia_id"))
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        pid = _get_id(obj, "wikipedia_id", where)
        title = _get_str(obj, "wikipedia_title", where, required=False, nonempty=False) or ""
        paras = obj.get("text")
        if isinstance(paras, str):
            paras = [paras]
        if not isinstance(paras, list) or not all(isinstance(p, str) for p in paras):
            raise ValueError(f"{where}: field 'text' must be a list of paragraph strings")
        paras = [p.strip() for p in paras if p.strip()]
        if paras and title and paras[0] == title.strip():
            paras = paras[1:]  # KILT pages start with their title
        if not paras:
            raise ValueError(f"{where}: field 'text' has no paragraph")
        ids.add(pid, where, lineno)
        out.append(Passage(pid, title, " ".join(paras)))
    return out


def _flashrag_corpus(path) -> list[Passage]:
    out: list[Passage] = []
    ids = _Ids(_jsonl_ids(path, "id"))
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        pid = _get_id(obj, "id", where)
        contents = _get_str(obj, "contents", where)
        title, sep, text = contents.partition("\n")
        if not sep or not text.strip():  # no title line
            title, text = "", contents
        title = title.strip()
        if len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]  # wiki-18 writes "Title"
        ids.add(pid, where, lineno)
        out.append(Passage(pid, title, text.strip()))
    return out


_CORPUS_LOADERS = {
    "ours": load_corpus,
    "beir": _beir_corpus,
    "dpr": _dpr_passages,
    "kilt": _kilt_corpus,
    "flashrag": _flashrag_corpus,
}


def load_corpus_file(path, *, data_format: str = "auto") -> list[Passage]:
    """The passages of a corpus file (or BEIR folder) in ``data_format`` (``auto``: see
    :func:`detect_format`; ``nq-open`` has no corpus layout, so its corpus is detected)."""
    fmt = _resolve(path, "corpus", data_format)
    return _CORPUS_LOADERS[fmt](path)


# ------------------------------------------------------------------------------ positives
class _Positives:
    """Collect each question's candidate gold ids, then keep those in the corpus (see the
    module docstring for the policy)."""

    def __init__(self, path, corpus_ids, *, strict: bool):
        self.path, self.ids, self.strict = path, corpus_ids, strict
        self.total = self.found = 0
        self.first_missing: tuple[int, str] | None = None

    def keep(self, candidates: list[str], lineno: int) -> list[str]:
        out = []
        for pid in candidates:
            self.total += 1
            if self.ids is None or pid in self.ids:
                if pid not in out:
                    out.append(pid)
                self.found += 1
            elif self.first_missing is None:
                self.first_missing = (lineno, pid)
        return out

    def missed(self, lineno: int, what: str) -> None:
        """A candidate that could not be matched at all (e.g. a DPR context by title/text)."""
        self.total += 1
        if self.first_missing is None:
            self.first_missing = (lineno, what)

    def report(self) -> None:
        missing = self.total - self.found
        if not missing:
            return
        line, pid = self.first_missing
        if self.found == 0 and self.strict:
            raise ValueError(
                f"{self.path}: none of the {self.total} gold passages is in the corpus (line "
                f"{line}: {pid!r}): is --corpus the matching corpus?"
            )
        if self.found == 0:
            warn(
                f"{self.path}: no gold passage id is a corpus id (line {line}: {pid!r}): no "
                "retrieval metrics for these questions (key the corpus by wikipedia_id)"
            )
        else:
            warn(
                f"{self.path}: {missing} of {self.total} gold passages are not in the corpus "
                f"(first: line {line}, {pid!r}); they were dropped"
            )


# ------------------------------------------------------------------------------ question loaders
def _find_qrels(path, role: str) -> tuple[str | None, str | None]:
    """``(qrels file, None)`` of a BEIR folder for ``role`` (train: ``qrels/train.tsv``;
    dev: ``qrels/dev.tsv``; eval: ``qrels/test.tsv``, else ``qrels/dev.tsv``), or ``(None,
    what is wrong)``."""
    qdir = os.path.join(path, "qrels")
    names = {"train": ["train.tsv"], "dev": ["dev.tsv"]}.get(role, ["test.tsv", "dev.tsv"])
    for name in names:
        p = os.path.join(qdir, name)
        if os.path.isfile(p):
            return p, None
    have = sorted(n for n in os.listdir(qdir) if n.endswith(".tsv")) if os.path.isdir(qdir) else []
    has = f"it has qrels/{', qrels/'.join(have)}" if have else "it has no qrels/*.tsv"
    return None, (
        f"is a BEIR folder without qrels/{' or qrels/'.join(names)} for --{role} ({has}); "
        "pass the qrels file itself to choose a split"
    )


def _beir_qrels(path, role: str) -> str:
    found, problem = _find_qrels(path, role)
    if found is None:
        raise ValueError(f"{path}: {problem}")
    return found


def _beir_files(path, role: str) -> tuple[str, str]:
    """``(queries.jsonl, qrels tsv)`` for a BEIR folder, its queries.jsonl or a qrels file."""
    if os.path.isdir(path):
        return os.path.join(path, "queries.jsonl"), _beir_qrels(path, role)
    first = _first_char(path)
    if first and first != "{":  # qrels/<split>.tsv: queries.jsonl one level up
        here = os.path.dirname(os.path.abspath(path))
        for folder in (os.path.dirname(here), here):
            cand = os.path.join(folder, "queries.jsonl")
            if os.path.isfile(cand):
                return cand, path
        raise ValueError(f"{path}: BEIR qrels without a queries.jsonl next to its qrels/ folder")
    return path, _beir_qrels(os.path.dirname(os.path.abspath(path)), role)


def _beir_questions(path, role: str, corpus_ids) -> list[QAExample]:
    queries_path, qrels_path = _beir_files(path, role)
    qrels: dict[str, list[tuple[str, int]]] = {}  # query-id -> [(corpus-id, line)], score > 0
    qline: dict[str, int] = {}
    header = True
    for lineno, row in _tsv_rows(qrels_path):
        where = _where(qrels_path, lineno)
        if header:
            header = False
            if _is_qrels_header(row):
                continue
            raise ValueError(f"{where}: expected the header 'query-id<TAB>corpus-id<TAB>score'")
        if len(row) != 3:
            raise ValueError(f"{where}: expected 3 tab-separated columns, got {len(row)}")
        qid, pid, score = (c.strip() for c in row)
        if not qid or not pid:
            raise ValueError(f"{where}: empty query-id or corpus-id")
        try:
            value = float(score)
        except ValueError:
            raise ValueError(f"{where}: score must be a number, got {score!r}") from None
        qline.setdefault(qid, lineno)
        lst = qrels.setdefault(qid, [])
        if value > 0:
            lst.append((pid, lineno))
    positives = _Positives(qrels_path, corpus_ids, strict=True)
    out: list[QAExample] = []
    ids = _Ids(_jsonl_ids(queries_path, "_id"))
    for lineno, obj in _read_jsonl(queries_path):
        where = _where(queries_path, lineno)
        qid = _get_id(obj, "_id", where)
        question = _get_str(obj, "text", where)
        ids.add(qid, where, lineno)
        if qid not in qrels:
            continue  # a query of another split
        answers: list[str] = []
        meta = obj.get("metadata")
        if "answers" in obj:
            answers = _answers(obj["answers"], "answers", where)
        elif isinstance(meta, dict) and ("answers" in meta or "answer" in meta):
            key = "answers" if "answers" in meta else "answer"
            answers = _answers(meta[key], f"metadata.{key}", where)
        pos: list[str] = []
        for pid, line in qrels[qid]:
            pos += [p for p in positives.keep([pid], line) if p not in pos]
        out.append(QAExample(qid, question, answers, pos))
    missing = [q for q in qrels if q not in ids.seen]
    if missing:
        q = min(missing, key=qline.__getitem__)
        raise ValueError(
            f"{_where(qrels_path, qline[q])}: query-id {q!r} is not in {queries_path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    positives.report()
    return out


def _dpr_record(obj, where: str, lineno: int, n: int, positives, pending, corpus_ids):
    if not isinstance(obj, dict):
        raise ValueError(
            f"{where}: expected a JSON object (a DPR question), got {type(obj).__name__}"
        )
    question = _get_str(obj, "question", where)
    answers = _get_str_list(obj, "answers", where, required=True, nonempty=True)
    ctxs = obj.get("positive_ctxs", [])
    if not isinstance(ctxs, list):
        raise ValueError(f"{where}: field 'positive_ctxs' must be a list of objects")
    ex = QAExample(str(n), question, answers, [])
    for j, ctx in enumerate(ctxs):
        if not isinstance(ctx, dict):
            raise ValueError(f"{where}: positive_ctxs[{j}] must be an object")
        pid = ctx.get("passage_id", ctx.get("psg_id", ctx.get("id")))
        if pid is not None and not isinstance(pid, bool) and isinstance(pid, (str, int)):
            pid = str(pid)
            if corpus_ids is None or pid in corpus_ids:
                for p in positives.keep([pid], lineno):
                    if p not in ex.positive_ids:
                        ex.positive_ids.append(p)
                continue
        title, text = ctx.get("title", ""), ctx.get("text")
        if not isinstance(text, str) or not isinstance(title, str):
            if pid is None:
                raise ValueError(
                    f"{where}: positive_ctxs[{j}] needs a 'passage_id' or string 'title' and 'text'"
                )
            positives.missed(lineno, pid)
            continue
        pending.setdefault((title.strip(), text.strip()), []).append((ex, lineno, pid))
    return ex


def _dpr_json(path, corpus, corpus_ids) -> list[QAExample]:
    out: list[QAExample] = []
    positives = _Positives(path, corpus_ids, strict=True)
    pending: dict[tuple[str, str], list] = {}  # (title, text) -> [(example, line, passage_id)]
    if _first_char(path) == "[":
        records = iter_json_array(path)
    else:  # one DPR object per line
        records = _read_jsonl(path)
    for lineno, obj in records:
        where = _where(path, lineno)
        out.append(_dpr_record(obj, where, lineno, len(out), positives, pending, corpus_ids))
    if pending:  # one pass over the corpus resolves the contexts without a usable passage_id
        found: dict[tuple[str, str], str] = {}
        for p in corpus or ():
            key = (p.title.strip(), p.text.strip())
            if key in pending and key not in found:
                found[key] = p.id
        for key, users in pending.items():
            for ex, lineno, pid in users:
                if key in found:
                    positives.total += 1
                    positives.found += 1
                    if found[key] not in ex.positive_ids:
                        ex.positive_ids.append(found[key])
                else:
                    positives.missed(lineno, pid if pid is not None else key[0] or key[1][:40])
    positives.report()
    return out


def _parse_answer_list(text: str, where: str) -> list[str]:
    try:
        v = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        v = None
    if (
        not isinstance(v, (list, tuple))
        or not v
        or not all(isinstance(a, str) and a.strip() for a in v)
    ):
        raise ValueError(
            f"{where}: the answers column must be a non-empty list of strings like "
            f"['answer one', 'answer two'], got {text[:60]!r}"
        )
    return list(v)


def _dpr_qa_tsv(path) -> list[QAExample]:
    first = _first_line(path) or ""
    delimiter = "," if "," in first and "\t" not in first else "\t"
    out: list[QAExample] = []
    for lineno, row in _tsv_rows(path, delimiter):
        where = _where(path, lineno)
        if not out and [c.strip().lower() for c in row] in (
            ["question", "answers"],
            ["question", "answer"],
        ):
            continue  # an optional header
        if len(row) != 2:
            raise ValueError(
                f"{where}: expected 2 columns (question, answer list) separated by "
                f"{'a tab' if delimiter == chr(9) else 'a comma'}, got {len(row)}"
            )
        question = row[0].strip()
        if not question:
            raise ValueError(f"{where}: empty question")
        out.append(QAExample(str(len(out)), question, _parse_answer_list(row[1], where), []))
    return out


def _nq_open(path) -> list[QAExample]:
    out: list[QAExample] = []
    ids = _Ids(_jsonl_ids(path, "id"))
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        qid = _get_id(obj, "id", where) if "id" in obj else str(len(out))
        question = _get_str(obj, "question", where)
        if "answer" not in obj:
            raise ValueError(f"{where}: missing field 'answer'")
        answers = _answers(obj["answer"], "answer", where)
        if not answers:
            raise ValueError(f"{where}: field 'answer' must not be empty")
        ids.add(qid, where, lineno)
        out.append(QAExample(qid, question, answers, []))
    return out


def _kilt_questions(path, corpus_ids) -> list[QAExample]:
    out: list[QAExample] = []
    ids = _Ids(_jsonl_ids(path, "id"))
    positives = _Positives(path, corpus_ids, strict=False)
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        qid = _get_id(obj, "id", where)
        question = _get_str(obj, "input", where)
        outputs = obj.get("output")
        if not isinstance(outputs, list):
            raise ValueError(f"{where}: field 'output' must be a list of objects")
        answers: list[str] = []
        candidates: list[str] = []
        for j, o in enumerate(outputs):
            if not isinstance(o, dict):
                raise ValueError(f"{where}: output[{j}] must be an object")
            a = o.get("answer")
            if isinstance(a, str) and a.strip() and a not in answers:
                answers.append(a)
            elif a is not None and not isinstance(a, str):
                raise ValueError(f"{where}: output[{j}].answer must be a string")
            prov = o.get("provenance", [])
            if not isinstance(prov, list):
                raise ValueError(f"{where}: output[{j}].provenance must be a list")
            for k, pr in enumerate(prov):
                if not isinstance(pr, dict) or "wikipedia_id" not in pr:
                    raise ValueError(
                        f"{where}: output[{j}].provenance[{k}] must be an object with a wikipedia_id"
                    )
                candidates.append(
                    _get_id(pr, "wikipedia_id", f"{where}: output[{j}].provenance[{k}]")
                )
        if not answers:
            raise ValueError(f"{where}: no 'answer' in output (a KILT test file without outputs?)")
        ids.add(qid, where, lineno)
        unique = list(dict.fromkeys(candidates))
        out.append(QAExample(qid, question, answers, positives.keep(unique, lineno)))
    positives.report()
    return out


def _flashrag_questions(path) -> list[QAExample]:
    out: list[QAExample] = []
    ids = _Ids(_jsonl_ids(path, "id"))
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        qid = _get_id(obj, "id", where)
        question = _get_str(obj, "question", where)
        if "golden_answers" not in obj:
            raise ValueError(f"{where}: missing field 'golden_answers'")
        answers = _answers(obj["golden_answers"], "golden_answers", where)
        if not answers:
            raise ValueError(f"{where}: field 'golden_answers' must not be empty")
        ids.add(qid, where, lineno)
        out.append(QAExample(qid, question, answers, []))
    return out


def load_questions_file(
    path,
    *,
    split: str = "train",
    corpus: Sequence[Passage] | None = None,
    corpus_ids=None,
    data_format: str = "auto",
) -> list[QAExample]:
    """The questions of a ``--train`` (``split="train"``), ``--dev`` (``split="dev"``) or
    ``--eval`` (``split="eval"``) file or BEIR folder in ``data_format`` (the split only
    chooses a BEIR folder's qrels file, see :func:`data_path_problem`). ``corpus_ids`` (a set; built from ``corpus`` when
    only that is given) checks / filters the gold passage ids; ``corpus`` is needed to match
    DPR contexts that have no usable ``passage_id`` by their title and text. Without either,
    positive ids are kept unchecked (DPR contexts without ``passage_id`` are then dropped)."""
    if split not in ("train", "dev", "eval"):
        raise ValueError(f"split must be 'train', 'dev' or 'eval', got {split!r}")
    if corpus_ids is None and corpus is not None:
        corpus_ids = {p.id for p in corpus}
    elif corpus_ids is not None and not isinstance(corpus_ids, (set, frozenset, dict)):
        corpus_ids = set(corpus_ids)
    fmt = _resolve(path, split, data_format)
    if fmt == "ours":
        return load_qa(path, corpus_ids=corpus_ids)
    if fmt == "beir":
        return _beir_questions(path, split, corpus_ids)
    if fmt == "dpr":  # by content: a JSON array, JSON lines, else the QA TSV/CSV
        if _first_char(path) in ("[", "{"):
            return _dpr_json(path, corpus, corpus_ids)
        return _dpr_qa_tsv(path)
    if fmt == "nq-open":
        return _nq_open(path)
    if fmt == "kilt":
        return _kilt_questions(path, corpus_ids)
    return _flashrag_questions(path)


# ------------------------------------------------------------------------------ retrieval-only
def training_answers_problem(path, examples: Sequence[QAExample]) -> str | None:
    """Why ``examples`` cannot be trained on (None when every question has an answer): the
    co-training loss is the generator's likelihood of the answer given retrieved passages,
    so a question without answers (retrieval-only data such as BEIR) cannot be a training
    question. Evaluation works: retrieval metrics only."""
    bad = [ex for ex in examples if not ex.answers]
    if not bad:
        return None
    return (
        f"{path}: {len(bad)} of {len(examples)} training questions have no answer (e.g. "
        f"{bad[0].id!r}): retrieval-only data (BEIR queries without answers) cannot be "
        "trained on, every objective scores the answer; evaluate retrieval alone with "
        "rag-kernels train --steps 0 --corpus ... --eval ... (no --train), or add answers "
        "to the queries ('answers', or 'answer' in their 'metadata')"
    )


# ------------------------------------------------------------------------------ a whole data set
def load_dataset_files(
    corpus=None,
    train=None,
    eval=None,
    *,
    dev=None,
    data_format: str = "auto",
    data_seed: int = 0,
) -> Dataset:
    """A :class:`~.jsonl.Dataset` from a corpus and question files (``dev`` fills ``dev``,
    ``eval`` fills ``test``).
    Without ``corpus`` the embedded default set is the base (its splits are replaced by the
    files given). Raises ``ValueError`` naming the file (and line) for malformed data and an
    empty corpus."""
    if corpus is None:
        ds = load_default(seed=data_seed)
    else:
        passages = load_corpus_file(corpus, data_format=data_format)
        if not passages:
            raise ValueError(f"{corpus}: the corpus is empty (no passages)")
        ds = Dataset(corpus=passages, train=[], dev=[], test=[])
    ids = {p.id for p in ds.corpus}
    kw = dict(corpus=ds.corpus, corpus_ids=ids, data_format=data_format)
    if train is not None:
        ds.train = load_questions_file(train, split="train", **kw)
    if dev is not None:
        ds.dev = load_questions_file(dev, split="dev", **kw)
    if eval is not None:
        ds.test = load_questions_file(eval, split="eval", **kw)
    return ds
