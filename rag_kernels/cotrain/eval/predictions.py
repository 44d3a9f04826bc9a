"""``predictions.jsonl``: what the evaluation answered, one JSON object per question.

Each line is ``{"id", "question", "gold_answers", "prediction", "retrieved"}``, where
``retrieved`` lists the K documents the answer was decoded from, best first, as
``{"id": passage id, "score": retriever score}`` (``p(k|x)`` is the softmax of the scores).
The file is written atomically next to ``metrics.json`` by the symlink-safe helpers of
:mod:`~rag_kernels.cotrain.training.files` (a planted symlink is replaced, never followed).

Stdlib only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from ..training.files import atomic_write

__all__ = ["PREDICTIONS", "prediction_record", "read_predictions", "write_predictions"]

PREDICTIONS = "predictions.jsonl"


def prediction_record(example, prediction: str, retrieved: Sequence[tuple[str, float]]) -> dict:
    """The line of one question: ``example`` is a QAExample, ``retrieved`` its K
    ``(passage id, score)`` pairs, best first."""
    return {
        "id": example.id,
        "question": example.question,
        "gold_answers": list(example.answers),
        "prediction": prediction,
        "retrieved": [
            {"id": pid, "score": float(s) if math.isfinite(float(s)) else None}
            for pid, s in retrieved
        ],
    }


def write_predictions(path: str, records: Sequence[dict]) -> None:
    """Write ``records`` as JSON lines to ``path`` (atomic; a symlink there is replaced)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_predictions(path: str) -> list[dict]:
    """The records of a ``predictions.jsonl`` (for tests and analysis)."""
    from ..training.files import read_bytes

    text = read_bytes(path).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
