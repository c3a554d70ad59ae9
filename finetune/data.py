"""Reading SQuAD v1.1 / v2.0 JSON into flat question records, with errors that say where.

Structural problems (not JSON, no ``data`` list, a question without ``id``) are errors naming the
file and the JSON path, because nothing sensible can be done with such a file. Problems that
concern one question (empty context, ``answer_start`` that does not point at the answer text) are
left to the caller, which skips and counts them by name (see :class:`Skips`).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class SquadFormatError(ValueError):
    """The file is not SQuAD JSON; the message names the file and the offending JSON path."""


@dataclass
class Example:
    qid: str
    title: str
    context: str
    question: str
    answers: list[str] = field(default_factory=list)        # reference texts
    answer_starts: list[int] = field(default_factory=list)  # character offsets into context
    is_impossible: bool = False                              # SQuAD 2.0 no-answer question


@dataclass
class SquadFile:
    path: Path
    examples: list[Example]
    version_2: bool  # True when any question carries ``is_impossible`` (SQuAD 2.0 layout)


def _get(obj, key, typ, where, path):
    if not isinstance(obj, dict):
        raise SquadFormatError(f"{path}: {where} should be an object, got {type(obj).__name__}")
    if key not in obj:
        raise SquadFormatError(f"{path}: {where} has no key '{key}'")
    value = obj[key]
    if not isinstance(value, typ):
        raise SquadFormatError(
            f"{path}: {where}.{key} should be {typ.__name__ if isinstance(typ, type) else typ}, "
            f"got {type(value).__name__}")
    return value


def load_json(path: Path):
    """The parsed JSON of ``path``; a missing or non-JSON file is a :class:`SquadFormatError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SquadFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadFormatError(f"{path}: not a JSON file ({e})") from None


def read_squad(path: str | Path) -> SquadFile:
    """Parse a SQuAD file; raise :class:`SquadFormatError` naming file and location on bad layout."""
    path = Path(path)
    raw = load_json(path)
    articles = _get(raw, "data", list, "top level", path)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    version_2 = False
    for a, article in enumerate(articles):
        paragraphs = _get(article, "paragraphs", list, f"data[{a}]", path)
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, para in enumerate(paragraphs):
            where_p = f"data[{a}].paragraphs[{p}]"
            context = _get(para, "context", str, where_p, path)
            for q, qa in enumerate(_get(para, "qas", list, where_p, path)):
                where = f"{where_p}.qas[{q}]"
                qid = _get(qa, "id", (str, int), where, path)
                qid = str(qid)
                if qid in seen:
                    raise SquadFormatError(f"{path}: {where}: duplicate question id '{qid}' "
                                           f"(first at {seen[qid]})")
                seen[qid] = where
                question = _get(qa, "question", str, where, path)
                answers = _get(qa, "answers", list, where, path) if "answers" in qa else []
                texts, starts = [], []
                for i, ans in enumerate(answers):
                    texts.append(_get(ans, "text", str, f"{where}.answers[{i}]", path))
                    starts.append(_get(ans, "answer_start", int, f"{where}.answers[{i}]", path))
                impossible = bool(qa.get("is_impossible", False))
                version_2 |= "is_impossible" in qa
                examples.append(Example(qid, title, context, question, texts, starts, impossible))
    if not examples:
        raise SquadFormatError(f"{path}: no questions found under 'data'")
    return SquadFile(path, examples, version_2)


class Skips(Counter):
    """Counts of skipped questions/features by reason, with the first few ids kept for the log."""

    def __init__(self):
        super().__init__()
        self.ids: dict[str, list[str]] = {}

    def add(self, reason: str, qid: str) -> None:
        self[reason] += 1
        self.ids.setdefault(reason, [])
        if len(self.ids[reason]) < 5 and qid not in self.ids[reason]:
            self.ids[reason].append(qid)

    def report(self) -> dict:
        return {r: {"count": n, "examples": self.ids.get(r, [])} for r, n in sorted(self.items())}

    def describe(self) -> str:
        if not self:
            return "none"
        return "; ".join(f"{r}: {n} (e.g. {', '.join(self.ids.get(r, []))})"
                         for r, n in sorted(self.items()))
