"""Public-domain English text collections from Debian packages, for studies on text the project
was not developed on (tools/gate_sweep.py). Nothing is copied into the repository.

    python tools/fetch_corpora.py DIR      # writes DIR/jargon/ and DIR/kjv/

- jargon: the Jargon File 4.4.7 (package jargon-text; "in the public domain"), one document.
- kjv: the King James Version of the Bible (packages bible-kjv, bible-kjv-text; the 1611
  translation's copyright has expired), one document per book, verse numbers removed.

Needs `apt-get download` and `dpkg-deb` (Debian or Ubuntu); no root.
"""

import argparse
import gzip
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_CHAPTER = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]*?) (\d+)$")
_VERSE = re.compile(r"^ *\d+ ")


def _unpack(packages: list[str], into: Path) -> Path:
    subprocess.run(["apt-get", "download", *packages], cwd=into, check=True, capture_output=True)
    root = into / "root"
    for deb in sorted(into.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def jargon(out: Path, scratch: Path) -> list[Path]:
    root = _unpack(["jargon-text"], scratch)
    text = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "en_jargon_file.txt"
    path.write_text(text.replace("\r\n", "\n"))
    return [path]


def kjv_books(formatted: str) -> dict[str, str]:
    """The `bible` output split into books: {name: text}, chapters headed "Name N"."""
    books: dict[str, list[str]] = {}
    book = None
    for line in formatted.splitlines():
        header = _CHAPTER.match(line.strip())
        if header and not line.startswith(" "):
            book = header.group(1)
            books.setdefault(book, []).append(f"\n{book} {header.group(2)}\n")
        elif book is not None and line.strip():
            books[book].append(_VERSE.sub("", line))
    return {name: "\n".join(lines).strip() + "\n" for name, lines in books.items()}


def kjv(out: Path, scratch: Path) -> list[Path]:
    root = _unpack(["bible-kjv", "bible-kjv-text"], scratch)
    formatted = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "Ge1:1-Re22:21"],
                               check=True, capture_output=True, text=True).stdout
    books = kjv_books(formatted)
    if len(books) != 66:
        raise RuntimeError(f"expected the 66 books of the KJV, found {len(books)}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, text) in enumerate(books.items(), start=1):
        paths.append(out / f"en_kjv_{i:02d}_{name.lower().replace(' ', '_')}.txt")
        paths[-1].write_text(text)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    args = p.parse_args(argv)
    for name, fetch in (("jargon", jargon), ("kjv", kjv)):
        with tempfile.TemporaryDirectory() as scratch:
            try:
                paths = fetch(Path(args.dir) / name, Path(scratch))
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                print(f"error: {name}: could not unpack its Debian packages ({e})", file=sys.stderr)
                return 2
        print(f"{name}: {len(paths)} files, {sum(p.stat().st_size for p in paths):,} bytes in {Path(args.dir) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
