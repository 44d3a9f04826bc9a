"""The generator prompt template of ``--prompt-template``: a format string with the fields
``{passage}`` (the retrieved passage, cut to ``--max-doc-tokens`` tokens) and ``{question}``.

* :func:`template_problem` checks a template (at parse time, before anything heavy is
  imported): it must be a valid format string holding both fields, each at least once, and
  no other field (no positional ``{}``, no attribute / index access, no conversion or format
  spec); literal braces are written ``{{`` and ``}}``;
* :func:`format_prompt` fills it in and also returns where the passage is in the text (the
  character spans of every ``{passage}``), which ``--retriever-objective adist`` uses to find
  the passage's tokens.

The default, :data:`DEFAULT_PROMPT_TEMPLATE`, is the co-training prompt text of earlier
versions (``rk.hf.DEFAULT_RAG_PROMPT`` with ``{document}`` named ``{passage}``). With it, a
tokenizer without a chat template gets ``"\\nAnswer:"`` appended as before; a custom template
is used as written.

Stdlib only: the configuration validates templates before any model is loaded.
"""

from __future__ import annotations

import string

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "PROMPT_FIELDS",
    "format_prompt",
    "hf_prompt",
    "template_problem",
]

DEFAULT_PROMPT_TEMPLATE = "Context: {passage}\nQuestion: {question}\nAnswer with a few words."
PROMPT_FIELDS = ("passage", "question")
_BRACES = "write {{ and }} for literal braces"


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    return list(string.Formatter().parse(template))


def template_problem(template: str) -> str | None:
    """What is wrong with ``template`` ("must ..."), or None when it is a valid template."""
    try:
        parsed = _parse(template)
    except ValueError as e:
        return f"must be a valid format string ({e}; {_BRACES})"
    seen = set()
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PROMPT_FIELDS:
            shown = "{" + name + "}" if name else "{} (a positional field)"
            return (
                f"must use only the fields {{passage}} and {{question}}, found {shown} ({_BRACES})"
            )
        if spec or conversion:
            return f"must use plain {{{name}}}, without a conversion or format spec"
        seen.add(name)
    missing = [f"{{{f}}}" for f in PROMPT_FIELDS if f not in seen]
    if missing:
        return f"must contain {' and '.join(missing)}"
    return None


def format_prompt(
    template: str, *, passage: str, question: str
) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: ``template`` filled in, and the ``[start, end)`` character spans of
    the passage in ``text`` (one per ``{passage}`` field). ``text`` equals
    ``template.format(passage=passage, question=question)``."""
    problem = template_problem(template)
    if problem:
        raise ValueError(f"prompt template {problem}: {template!r}")
    parts, spans, pos = [], [], 0
    for literal, name, _spec, _conv in _parse(template):
        parts.append(literal)
        pos += len(literal)
        if name is None:
            continue
        value = passage if name == "passage" else question
        if name == "passage":
            spans.append((pos, pos + len(value)))
        parts.append(value)
        pos += len(value)
    return "".join(parts), spans


def hf_prompt(template: str | None) -> str | None:
    """``template`` as the ``prompt`` of ``rk.hf.build_rag_batch`` / ``rag_prompt_ids`` (whose
    fields are ``{question}`` and ``{document}``): None for the default (so that a tokenizer
    without a chat template gets its ``"\\nAnswer:"`` cue, as before), else the same format
    string with ``{passage}`` renamed (literal braces kept escaped)."""
    if template is None or template == DEFAULT_PROMPT_TEMPLATE:
        return None
    problem = template_problem(template)
    if problem:
        raise ValueError(f"prompt template {problem}: {template!r}")
    out = []
    for literal, name, _spec, _conv in _parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{document}" if name == "passage" else "{question}")
    return "".join(out)
