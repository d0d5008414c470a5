"""Paths that may be local or in object storage (gs://, ...): one place that names files.

Everything that reads or writes user data goes through `path()`, an etils epath, so a URL stays
a URL all the way down (a pathlib.Path would turn "gs://b/x" into the local "gs:/b/x").
"""

import glob as globlib
import os

from etils import epath

from hiermodel.errors import UserError


def is_url(name: str) -> bool:
    return "://" in str(name)


def path(name) -> epath.Path:
    """A path object for a local name or a URL; a local relative name is made absolute."""
    name = os.fspath(name) if not isinstance(name, str) else name
    return epath.Path(name) if is_url(name) else epath.Path(os.path.abspath(name))


def glob(pattern: str) -> list[str]:
    """Files matching a glob, sorted; `**` matches any depth."""
    if not is_url(pattern):
        return sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    root, _, rest = pattern.partition("://")
    parts = rest.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = path(f"{root}://{'/'.join(parts[:fixed])}")
    return sorted(str(p) for p in base.glob("/".join(parts[fixed:])) if p.is_file())


def list_files(directory: str) -> list[str]:
    """Files under a directory at any depth, sorted, hidden names (a leading dot) left out."""
    walk = path(directory).walk() if is_url(directory) else os.walk(directory)
    files = []
    for root, dirs, names in walk:
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(str(root), n) if not is_url(directory) else str(root / n)
                  for n in names if not n.startswith(".")]
    return sorted(files)


def size(name: str) -> int:
    try:
        return path(name).stat().length if is_url(name) else os.path.getsize(name)
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None


def read_range(name: str, start: int, end: int) -> bytes:
    """Bytes start..end-1 of a file (fewer at its end)."""
    try:
        with (path(name).open("rb") if is_url(name) else open(name, "rb")) as f:
            f.seek(start)
            return f.read(max(end - start, 0))
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None
