"""Stopping on a signal: every process of the job saves the same step, then exits.

One process: SIGTERM or SIGINT sets a flag the loop reads after each step. Several processes:
a flag would be seen at different steps by different processes, which would then take
different branches and hang in the next collective. JAX's preemption service (started by
jax.distributed) catches SIGTERM in its coordination client instead and agrees on one step for
all: the one after the furthest any process has reached. SIGINT is handed to it as SIGTERM.
A spot or preemptible VM is told it is going away by SIGTERM; other notices (a maintenance
event) reach JAX only where a notifier for them is registered.
"""

import os
import signal

import jax
from jax.experimental import multihost_utils


def _preemption_service() -> bool:
    from jax._src import distributed  # where jax.distributed keeps its state

    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


class StopRequest:
    """Asks the loop to checkpoint and stop; `reached(step)` is called after every step, by
    every process, with the same steps."""

    def __init__(self):
        self.signal: str | None = None
        self.shared = _preemption_service()
        # The service's SIGTERM handler lives in C++: a Python handler for SIGTERM would replace it.
        caught = (signal.SIGINT,) if self.shared else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in caught}

    def _handle(self, signum, frame):
        if self.shared:
            self.signal = self.signal or signal.Signals(signum).name
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        if not self.shared:
            return self.signal is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal = self.signal or "SIGTERM on another process"
            return True
        return False

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
