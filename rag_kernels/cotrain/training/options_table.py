"""The README's table of ``rag-kernels train`` options, generated from :class:`TrainConfig`
(flag, default, help: the same texts as ``--help``), so the two cannot drift apart::

    python -m rag_kernels.cotrain.training.options_table                   # print the table
    python -m rag_kernels.cotrain.training.options_table --write README.md # update README.md
    python -m rag_kernels.cotrain.training.options_table --check README.md # exit 1 if stale

In README.md the table sits between the lines :data:`BEGIN` and :data:`END`;
``tests/test_train_options.py`` checks that it is exactly :func:`options_table`.

Stdlib only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import _DEFAULT_TEXT, TrainConfig, default_text, field_kinds, flag_name

__all__ = ["BEGIN", "END", "options_table", "readme_table", "with_table"]

BEGIN = "<!-- options:begin -->"
END = "<!-- options:end -->"
_METAVAR = {int: "N", float: "X", str: "TEXT", bool: "[BOOL]"}
_PATHS = ("corpus", "train", "dev", "eval", "generator", "retriever", "output_dir")


def _md(text: str) -> str:
    """Text for a Markdown table cell: pipes and asterisks escaped, one line."""
    return " ".join(text.split()).replace("|", "\\|").replace("*", "\\*")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def options_table() -> str:
    """The Markdown table: one row per option, in the order of :class:`TrainConfig`."""
    kinds = field_kinds()
    rows = ["| option | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices")
        kind, _ = kinds[f.name]
        arg = "{" + ",".join(choices) + "}" if choices else _METAVAR.get(kind, "VALUE")
        if f.name in _PATHS:
            arg = "PATH"
        default = default_text(f.name)
        shown = _md(default) if f.name in _DEFAULT_TEXT else _code(default)
        rows.append(
            f"| {_code(flag_name(f.name) + ' ' + arg)} | {shown} | {_md(f.metadata['help'])} |"
        )
    return "\n".join(rows) + "\n"


def readme_table(text: str) -> str | None:
    """What ``text`` (README.md) holds between the markers, or None without them."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        return None
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END)
    return text[start:end].strip("\n") + "\n" if end > start else None


def with_table(text: str) -> str:
    """``text`` with the generated table between its markers (which must be there)."""
    if readme_table(text) is None:
        raise ValueError(f"expected one {BEGIN} line followed by one {END} line")
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END)
    return text[:start] + "\n" + options_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m rag_kernels.cotrain.training.options_table", description=__doc__
    )
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="README", help="replace the table in this file")
    group.add_argument("--check", metavar="README", help="exit 1 if its table is not current")
    args = ap.parse_args(argv)
    path = args.write or args.check
    if path is None:
        sys.stdout.write(options_table())
        return 0
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if args.check:
        ok = readme_table(text) == options_table()
        if not ok:
            print(f"{path}: the options table is out of date; run {ap.prog} --write {path}")
        return 0 if ok else 1
    new = with_table(text)
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
