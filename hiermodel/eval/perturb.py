"""Seeded character-level noise for robustness evaluation: swaps, drops, insertions, case flips, whitespace.

Text is read as UTF-8 with invalid bytes kept (surrogateescape), so any document can be
perturbed. The noise of each piece a document is read in depends only on the seed, its file and
its index there, not on batching.
"""

import dataclasses
from typing import Iterator

import numpy as np

from hiermodel.data.sources import DocumentSource, Piece
from hiermodel.errors import UserError


def _swap(chars, hit, rng):
    """Swap each hit character with the next one; a swapped pair is not touched again."""
    last = -2
    for i in np.flatnonzero(hit[:-1]):
        if i > last + 1:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            last = i
    return chars


def _drop(chars, hit, rng):
    return [c for c, h in zip(chars, hit) if not h]


def _insert(chars, hit, rng):
    """Before each hit character, one drawn from the document's own characters."""
    out = []
    for c, h in zip(chars, hit):
        if h:
            out.append(chars[rng.integers(len(chars))])
        out.append(c)
    return out


def _case(chars, hit, rng):
    return [c.swapcase() if h else c for c, h in zip(chars, hit)]


def _whitespace(chars, hit, rng):
    """At hit positions: a space is dropped or doubled; any other character gets a space after it."""
    out = []
    for c, h in zip(chars, hit):
        if not h:
            out.append(c)
        elif c.isspace():
            out.extend([] if rng.random() < 0.5 else [c, c])
        else:
            out.extend([c, " "])
    return out


KINDS = {"swap": _swap, "drop": _drop, "insert": _insert, "case": _case, "whitespace": _whitespace}


@dataclasses.dataclass(frozen=True)
class Perturbation:
    kind: str
    rate: float  # chance that each character is hit

    @classmethod
    def parse(cls, spec: str) -> "Perturbation":
        kind, sep, rate = spec.partition(":")
        if kind not in KINDS or not sep:
            raise UserError(f"--perturb {spec!r}: expected KIND:RATE with KIND one of {', '.join(KINDS)}")
        try:
            value = float(rate)
        except ValueError:
            raise UserError(f"--perturb {spec!r}: {rate!r} is not a number") from None
        if not 0 <= value <= 1:
            raise UserError(f"--perturb {spec!r}: the rate must be between 0 and 1")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.rate:g}"

    def apply(self, data: bytes, rng: np.random.Generator) -> bytes:
        chars = list(data.decode("utf-8", errors="surrogateescape"))
        if not chars:
            return data
        hit = rng.random(len(chars)) < self.rate
        return "".join(KINDS[self.kind](chars, hit, rng)).encode("utf-8", errors="surrogateescape")


class PerturbedSource:
    """A DocumentSource whose documents come back perturbed; `clean` is the source it perturbs
    (scoring measures bits against the clean text)."""

    def __init__(self, source: DocumentSource, perturbation: Perturbation, seed: int = 0):
        self.clean, self.perturbation, self.seed = source, perturbation, seed
        self.paths = source.paths

    def pieces(self, file_number: int) -> Iterator[Piece]:
        """The clean source's pieces of one file, each perturbed with a seed of its own."""
        for index, piece in enumerate(self.clean.pieces(file_number)):
            rng = np.random.default_rng([self.seed, file_number, index])
            yield dataclasses.replace(piece, data=self.perturbation.apply(piece.data, rng))
