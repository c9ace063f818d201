"""Regenerate the demo corpora (prose.txt, code.txt) from the Python standard library.

    python dzjax/data/make_corpus.py

Run once by hand; the demo reads the committed text files, so what it trains on never depends on
the Python that runs it. Documents are separated by a line holding only DOC_SEPARATOR.

- prose: English paragraphs of the docstrings of a fixed list of modules (code examples, tables
  and lists dropped, wrapped lines joined), one document per docstring.
- code: the source of small functions of another fixed list of modules, their docstrings removed,
  one document per function.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap
import warnings
from pathlib import Path

DOC_SEPARATOR = "<|doc|>"
HERE = Path(__file__).parent

PROSE_MODULES = (
    "os", "shutil", "pathlib", "json", "csv", "collections", "itertools", "functools", "string",
    "textwrap", "datetime", "calendar", "random", "statistics", "fractions", "decimal", "logging",
    "argparse", "subprocess", "threading", "queue", "socket", "email.message", "http.client",
    "urllib.parse", "zipfile", "tarfile", "tempfile", "glob", "difflib", "heapq", "bisect", "copy",
    "pickle", "unittest", "doctest", "inspect", "typing", "dataclasses", "enum", "contextlib",
    "io", "codecs", "locale", "gettext", "sched", "asyncio", "configparser", "hashlib", "secrets",
    "base64", "weakref", "types", "pprint", "warnings", "traceback", "pdb", "timeit", "gzip",
    "mailbox", "mimetypes", "html.parser", "xml.dom.minidom", "xml.etree.ElementTree", "smtplib",
    "ftplib", "imaplib", "uuid", "socketserver", "http.server", "http.cookies", "wave", "shlex",
    "cmd", "turtle", "platform", "ast", "tokenize", "pydoc", "optparse", "ipaddress", "graphlib",
    "filecmp", "netrc", "plistlib", "codeop", "runpy", "pkgutil", "modulefinder", "compileall",
    "multiprocessing.pool", "concurrent.futures",
)
CODE_MODULES = (
    "shutil", "posixpath", "textwrap", "string", "heapq", "bisect", "fractions", "statistics",
    "colorsys", "calendar", "difflib", "fnmatch", "glob", "shlex", "base64", "quopri", "csv",
    "json.encoder", "json.decoder", "urllib.parse", "ipaddress", "datetime", "random", "copy",
    "pprint", "reprlib", "functools", "graphlib", "configparser", "gettext", "locale", "netrc",
    "tempfile", "filecmp", "mimetypes", "zipfile", "tarfile", "argparse", "optparse",
)
PROSE_BUDGET, CODE_BUDGET = 150_000, 110_000  # characters; the files stay small enough to commit


def _documented(module) -> list:
    """The module, and its public classes, functions and methods defined in it, in name order."""
    objs = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        objs.append(obj)
        if inspect.isclass(obj):
            objs += [o for n, o in sorted(vars(obj).items()) if not n.startswith("_")
                     and (inspect.isfunction(o) or isinstance(o, property))]
    return objs


def _prose(docstring: str) -> str:
    """The paragraphs of a docstring that read as English sentences, wrapped lines joined."""
    kept = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(docstring)):
        if re.search(r"^\s", para, re.M) or ">>>" in para or "::" in para:
            continue  # indented blocks, examples, literal blocks
        para = " ".join(para.split())
        letters = sum(c.isalpha() or c == " " for c in para) / max(len(para), 1)
        if len(para) >= 60 and para[0].isupper() and para.endswith(".") and letters >= 0.9:
            kept.append(para)
    return "\n\n".join(kept)


def prose_documents() -> list[list[str]]:
    """Per module, its docstrings' prose."""
    per_module = []
    for name in PROSE_MODULES:
        docs = [getattr(obj, "__doc__", None) for obj in _documented(importlib.import_module(name))]
        per_module.append([text for doc in docs if isinstance(doc, str) and (text := _prose(doc))])
    return per_module


def _function_source(source: str, node: ast.FunctionDef) -> str:
    lines = source.splitlines()[node.lineno - 1 - len(node.decorator_list):node.end_lineno]
    body = node.body[0]
    if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) \
            and isinstance(body.value.value, str):  # drop the docstring: that is prose
        start = node.lineno - len(node.decorator_list)
        del lines[body.lineno - start:body.end_lineno - start + 1]
    text = textwrap.dedent("\n".join(lines))
    return re.sub(r"\n\s*\n", "\n\n", text).strip()


def code_documents() -> list[list[str]]:
    """Per module, the source of its functions and methods of 5 to 31 lines, at least 4 without
    their docstring."""
    per_module = []
    for name in CODE_MODULES:
        source = Path(importlib.import_module(name).__file__).read_text()
        functions = [_function_source(source, node) for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.FunctionDef)
                     and 4 <= node.end_lineno - node.lineno <= 30]
        per_module.append([text for text in functions if text.count("\n") >= 3])
    return per_module


def _write(name: str, per_module: list[list[str]], budget: int) -> None:
    """Take one document from each module in turn (for variety) until `budget` characters."""
    out, seen, size = [], set(), 0
    queues = [list(docs) for docs in per_module]
    while any(queues) and size < budget:
        for queue in queues:
            doc = queue.pop(0) if queue else ""
            if doc and doc not in seen and size + len(doc) <= budget:
                seen.add(doc)
                out.append(doc)
                size += len(doc)
    (HERE / name).write_text(f"\n{DOC_SEPARATOR}\n".join(out) + "\n")
    print(f"{name}: {len(out)} documents from {sum(map(bool, per_module))} modules, "
          f"{size} characters")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(f"harvesting from Python {sys.version.split()[0]}")
    _write("prose.txt", prose_documents(), PROSE_BUDGET)
    _write("code.txt", code_documents(), CODE_BUDGET)
