"""Paths that may be local or in object storage (gs://, ...): one place that names files.

Everything that reads or writes user data goes through `path()`, an etils epath, so a URL stays
a URL all the way down (a pathlib.Path would turn "gs://b/x" into the local "gs:/b/x").
"""

import glob as globlib
import logging
import os
import shutil

from etils import epath

from hiermodel.errors import UserError


def is_url(name: str) -> bool:
    return "://" in str(name)


def path(name) -> epath.Path:
    """A path object for a local name or a URL; a local relative name is made absolute."""
    if isinstance(name, epath.Path):
        return name
    name = os.fspath(name)
    if not is_url(name):
        return epath.Path(os.path.abspath(name))
    # gcsfs logs a traceback for every failed request before raising; the error we raise says it.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    return epath.Path(name)


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
        with open_file(name) as f:
            f.seek(start)
            return f.read(max(end - start, 0))
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None


def open_file(name, mode: str = "rb"):
    """A file object for a local name or a URL."""
    return path(name).open(mode) if is_url(name) else open(name, mode)


def write_atomically(name, data: bytes) -> None:
    """Write a whole file so that a reader never sees it half written: a local file through a
    temporary name and a rename; an object in a store appears whole when its upload completes."""
    if is_url(name):
        path(name).write_bytes(data)
        return
    partial = f"{name}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, name)


def upload(local_file: str, name: str) -> None:
    """Copy a local file to `name` (local or a URL), streamed."""
    with open(local_file, "rb") as source, open_file(name, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 24)


class LineLog:
    """A text file that grows by lines (metrics.jsonl). Object stores cannot append, so there the
    whole file is written again at each flush; runs log few enough lines for that to be cheap."""

    def __init__(self, name):
        self.name = str(name)
        if is_url(self.name):
            self._lines = path(self.name).read_text() if path(self.name).exists() else ""
        else:
            self._file = open(self.name, "a")

    def write(self, line: str) -> None:
        if is_url(self.name):
            self._lines += line
        else:
            self._file.write(line)

    def flush(self) -> None:
        if is_url(self.name):
            path(self.name).write_text(self._lines)
        else:
            self._file.flush()

    def close(self) -> None:
        if is_url(self.name):
            self.flush()
        else:
            self._file.close()
