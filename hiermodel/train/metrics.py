"""Where metrics go: the terminal (stdout: a bar on a terminal, lines in a log), RUN_DIR/metrics.jsonl
and TensorBoard (process 0 only)."""

import json
import math
import sys
import time

import jax
from tqdm import tqdm

from hiermodel import storage


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_rate(per_second: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if per_second >= scale:
            return f"{per_second / scale:.1f}{unit}"
    return f"{per_second:.0f}"


class MetricsWriter:
    def __init__(self, run_dir: str, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.run_dir = storage.path(run_dir)
        self.total_steps = total_steps
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.jsonl = self.tensorboard = self.bar = None

    def begin(self, step: int) -> None:
        """Training starts after `step`: a progress bar from there when stdout is a terminal."""
        if self.enabled and sys.stdout.isatty():
            self.bar = tqdm(total=self.total_steps, initial=step, unit="step", file=sys.stdout, dynamic_ncols=True)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _open(self) -> None:
        """On the first record, so that a run that fails before it leaves no empty files behind."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = storage.LineLog(self.run_dir / "metrics.jsonl")
        from tensorboardX import SummaryWriter  # writes gs:// itself, through google-cloud-storage
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        record = {"step": step, "kind": prefix, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        self.tensorboard.flush()

    def progress(self, step: int, metrics: dict) -> None:
        """One line per log interval: step, loss, bits per byte, throughput, ETA."""
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()
        elapsed = time.monotonic() - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        mfu = format(metrics["mfu"], ".1%") if "mfu" in metrics else "?"
        line = (f"step {step:>6}/{self.total_steps}  loss {metrics['loss']:.4f}  bpb {metrics['bpb']:.3f}  "
                f"{format_rate(metrics['bytes_per_s'])}B/s  mfu {mfu}  data wait {metrics['data_wait']:.0%}  "
                f"lr {metrics['lr']:.2e}  gnorm {metrics['grad_norm']:.2f}  eta {format_duration(eta) if done else '?'}")
        if "alpha" in metrics:
            line += f"  deleted {metrics['deletion']:.1%} (soft {metrics['deletion_soft']:.1%})  alpha {metrics['alpha']:.3g}"
        self._print(line)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def info(self, message: str, every_process: bool = False) -> None:
        if self.enabled:
            self._print(message)
        elif every_process:
            print(f"process {jax.process_index()}: {message}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.tensorboard.close()


def read_metrics(run_dir: str, kind: str = "train") -> dict[int, dict]:
    """The last record of each step (a resumed run logs the steps after its checkpoint again)."""
    records = {}
    path = storage.path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == kind:
            records[record["step"]] = record
    return records
