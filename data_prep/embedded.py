"""An English corpus from what every Python install has: the language reference topics
(``pydoc_data.topics``) and the standard library's docstrings, read with ``ast`` so that no
module is imported (some, like ``antigravity``, act when imported). Used by ``./launch.sh demo``.
"""
from __future__ import annotations

import ast
import os
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from .atomic import write_text

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _paragraphs(text: str) -> list[str]:
    """Docstring -> paragraphs: wrapped lines joined; code examples and rules dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [x.strip() for x in block.splitlines() if x.strip()]
        if not lines or any(x.startswith((">>>", "...", "$ ")) for x in lines):
            continue
        para = " ".join(lines)
        letters = sum(c.isalpha() for c in para)
        if len(para) < 20 or letters < 0.6 * len(para):  # tables, signatures, underlines
            continue
        out.append(para)
    return out


def _topic_documents() -> Iterator[list[str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        paras = _paragraphs(topics[name])
        if paras:
            yield paras


def _docstring_documents() -> Iterator[list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts)))
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        paras = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paras.extend(_paragraphs(doc))
        # dedupe within a module (ast.walk visits the module node twice here); keep order
        seen, uniq = set(), []
        for p in paras:
            if p not in seen:
                seen.add(p)
                uniq.append(p)
        if uniq:
            yield uniq


def write_corpus(out_dir: str | os.PathLike, max_bytes: int = 4_000_000) -> Path:
    """Write ``OUT_DIR/stdlib_docs.txt`` (plain-text format: a paragraph a line, a blank line between
    documents), at most ``max_bytes``; the same Python version gives the same file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "stdlib_docs.txt"
    parts, size = [], 0
    for doc in [*_topic_documents(), *_docstring_documents()]:
        text = "\n".join(doc) + "\n\n"
        n = len(text.encode())
        if size + n > max_bytes:
            break
        parts.append(text)
        size += n
    corpus = "".join(parts)
    # unchanged: keep the file's mtime, so a later build sees nothing new to do
    if not (target.is_file() and target.read_text(encoding="utf-8") == corpus):
        write_text(target, corpus)
    return target
