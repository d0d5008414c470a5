"""Progress on long work: a bar with rate and ETA on a terminal, a plain line now and then when
the output is a file or a pipe (logs stay readable)."""

import sys
import time

from tqdm import tqdm


class Progress:
    """Reports `done` out of `total` units (None: not known ahead); call with the running count."""

    def __init__(self, total: int | None, what: str, unit: str = "B", every_s: float = 30.0, enabled: bool = True):
        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.enabled = enabled
        self.started = self.printed = time.monotonic()
        self.bar = (tqdm(total=total, desc=what, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                         leave=True) if enabled and sys.stderr.isatty() else None)

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if now - self.printed >= self.every_s or (self.total is not None and done >= self.total):
            self.printed = now
            rate = done / max(now - self.started, 1e-9)
            out_of = "" if self.total is None else f"/{self.total:,}"
            print(f"{self.what}: {done:,}{out_of} {self.unit} ({rate:,.0f} {self.unit}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
