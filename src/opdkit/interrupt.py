"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption).

The first signal asks the run to stop: the step in progress finishes (a step is atomic: its rollout,
teacher and update all happen, or none of its update does), the last completed step is checkpointed, the
command prints how to resume and exits with :data:`EXIT_INTERRUPTED`. Every process of a multi-process run
gets the signal (``torchrun`` forwards it); they agree at the step boundary, so all stop after the same
step. A second signal abandons the step at once (the last checkpoint then stands).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from opdkit.errors import OpdkitError

__all__ = ["EXIT_INTERRUPTED", "Interrupted", "StopRequests"]

#: Exit status of a run stopped by a signal after saving its state (EX_TEMPFAIL: try again, i.e. resume).
EXIT_INTERRUPTED = 75


class Interrupted(OpdkitError):
    """The run stopped on a signal; ``checkpoint`` is what it can be resumed from (or None)."""

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signal_name` instead of killing the process;
    a second one raises ``KeyboardInterrupt``. Outside the main thread it does nothing (signals can only be
    handled there)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: abandoning the step")
        self.signal_name = signal.Signals(signum).name
        if os.environ.get("RANK", "0") == "0":  # say at once that it was heard (a step can take minutes)
            print(f"\nopdkit: {self.signal_name} received: finishing the current step, then saving a checkpoint "
                  "(a second signal abandons the step)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
