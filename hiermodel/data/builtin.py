"""The built-in corpus: documentation that ships with every CPython, so nothing is downloaded."""

import importlib
import inspect
import warnings
import zlib

# Pure-Python standard library modules with substantial docstrings, cheap to import.
_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json",
    "locale", "logging", "mailbox", "pathlib", "pickle", "pickletools", "pprint", "queue",
    "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "zipfile",
)
EVAL_SHARE = 10  # one document in ten is held out


def _module_document(name: str) -> str:
    with warnings.catch_warnings():  # some modules warn about deprecated members on access
        warnings.simplefilter("ignore")
        return _describe(importlib.import_module(name), name)


def _describe(module, name: str) -> str:
    parts = [f"Module {name}\n\n{inspect.getdoc(module) or ''}"]
    for attr, member in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(member, "__module__", None) != name:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            doc = inspect.getdoc(member)
            if doc:
                parts.append(f"{name}.{attr}\n\n{doc}")
    return "\n\n".join(parts)


def builtin_documents(split: str) -> list[tuple[str, bytes]]:
    """(name, UTF-8 bytes) of the built-in corpus; split is "train", "eval" or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown built-in split {split!r}: use train, eval or all")
    from pydoc_data.topics import topics

    named = [(f"pydoc:{key}", text) for key, text in sorted(topics.items())]
    named += [(f"module:{name}", _module_document(name)) for name in _MODULES]
    documents = []
    for name, text in named:
        held_out = zlib.crc32(name.encode()) % EVAL_SHARE == 0
        if split == "all" or held_out == (split == "eval"):
            documents.append((name, text.encode("utf-8", errors="surrogateescape")))
    return documents
