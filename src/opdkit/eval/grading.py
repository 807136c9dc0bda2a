"""Grading with a time limit, in this process or in a pool of worker processes.

Every grade is bounded (``timeout_s``): a pathological answer such as ``\\boxed{9^{9^{9^9}}}`` (sympy tries to
evaluate it) counts as wrong with status ``"timeout"`` instead of hanging the evaluation.

- In a main thread, :func:`grade_answer` bounds the comparison with an interval timer (``SIGALRM``) in
  this process: no process start, microseconds of overhead.
- Anywhere else (another thread, or a main thread whose interval timer is already in use) it sends the
  comparison to a worker process, one per concurrent call (up to 8), killed and replaced when it overruns;
  threads grading at the same time do not wait for each other.
- :class:`GradingPool` grades many answers in parallel worker processes. The workers are plain
  subprocesses (``python -m opdkit.eval.grading_worker``) speaking JSON lines on stdin/stdout, so they work
  from any context (scripts without a ``__main__`` guard, daemonic processes, threads) and never import
  torch. Each grade in a worker is bounded by the worker's own timer; the parent also keeps a hard deadline
  (``timeout_s`` + a grace period) and kills a worker stuck in C code, which no signal can interrupt.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opdkit.errors import OpdkitError
from opdkit.eval.answers import check_fallbacks, extract_answer

__all__ = ["CORRECT", "ERROR", "Grade", "GradingPool", "NO_ANSWER", "TIMEOUT", "WRONG", "grade", "grade_answer",
           "grade_many"]

CORRECT, WRONG, NO_ANSWER, TIMEOUT, ERROR = "correct", "wrong", "no_answer", "timeout", "error"
DEFAULT_TIMEOUT_S = 5.0
_GRACE_S = 2.0  # the parent's deadline is the worker's own limit plus this


@dataclass(frozen=True)
class Grade:
    """One graded answer: ``correct``, and ``status`` one of correct / wrong / no_answer / timeout / error
    (an error is a failure inside the grader; it counts as wrong)."""

    correct: bool
    status: str

    @staticmethod
    def of(status: str) -> Grade:
        return Grade(status == CORRECT, status)


class _Overrun(BaseException):
    """Raised by the interval timer; a BaseException so that no ``except Exception`` inside the grader
    swallows it."""


def _timer_free() -> bool:
    return (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _compare_here(answer: str, gold: str, timeout_s: float | None) -> str:
    from opdkit.eval.equivalence import equivalent, load

    load()

    if not timeout_s:
        try:
            return CORRECT if equivalent(answer, gold) else WRONG
        except Exception:
            return ERROR

    def on_alarm(signum, frame):
        raise _Overrun

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return CORRECT if equivalent(answer, gold) else WRONG
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Overrun:
        return TIMEOUT
    except Exception:
        return ERROR
    finally:
        signal.signal(signal.SIGALRM, old)


def grade_answer(answer: str | None, gold, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """Grade an extracted ``answer`` (None: no answer) against ``gold`` within ``timeout_s`` seconds."""
    if answer is None:
        return Grade.of(NO_ANSWER)
    if gold is None or not str(gold).strip():
        return Grade.of(WRONG)
    if _timer_free():
        return Grade.of(_compare_here(answer, str(gold), timeout_s))
    return _grade_off_main_thread(answer, str(gold), timeout_s)


def grade(response: str, gold: str, *, fallbacks=(), timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``response``'s final answer (:func:`opdkit.eval.extract_answer`) equals ``gold`` (symbolic
    equivalence, :func:`opdkit.eval.equivalence.equivalent`), graded within ``timeout_s`` seconds (an
    overrun is wrong). Safe to call from any thread and from worker processes."""
    if not isinstance(response, str):
        return False
    return grade_answer(extract_answer(response, fallbacks), gold, timeout_s=timeout_s).correct


class _Worker:
    def __init__(self, timeout_s: float):
        import opdkit

        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.abspath(opdkit.__file__)))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opdkit.eval.grading_worker", str(timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env, text=True, bufsize=1,
        )
        self.ready = False
        self.task: int | None = None
        self.started = 0.0

    def send(self, task: int, answer: str, gold: str) -> None:
        self.task, self.started = task, time.monotonic()
        self.proc.stdin.write(json.dumps([task, answer, gold]) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: S110 - already gone
            pass
        self.stderr.close()

    def failure(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self.proc.poll()}"


class GradingPool:
    """Grades many answers in ``processes`` worker processes, each grade within ``timeout_s`` seconds.

    Use as a context manager (or call :meth:`close`). Results come back in the order given and do not
    depend on the number of processes. A worker that overruns its deadline or dies is replaced; its answer
    counts as ``timeout`` (or ``error``).
    """

    def __init__(self, processes: int = 2, *, timeout_s: float = DEFAULT_TIMEOUT_S, fallbacks=()):
        if processes < 1:
            raise ValueError(f"processes: expected >= 1, got {processes}")
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.processes, self.timeout_s = processes, float(timeout_s)
        self.fallbacks = check_fallbacks(fallbacks)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.replaced = 0  # workers killed or lost (overruns, crashes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.proc.stdin.close()
            except Exception:  # noqa: S110
                pass
            w.kill()
        self._workers = []

    def grade(self, items: Sequence[tuple[str, str]]) -> list[Grade]:
        """Grade ``(response, gold)`` pairs (extraction with this pool's fall-backs, then comparison)."""
        return self.grade_answers([(extract_answer(r, self.fallbacks), g) for r, g in items])

    def grade_answers(self, items: Sequence[tuple[str | None, str]]) -> list[Grade]:
        """Grade ``(extracted answer or None, gold)`` pairs."""
        with self._lock:
            return self._run(list(items))

    def _run(self, items: list[tuple[str | None, str]]) -> list[Grade]:
        results: list[Grade | None] = [None] * len(items)
        todo = []
        for i, (answer, gold) in enumerate(items):
            if answer is None:
                results[i] = Grade.of(NO_ANSWER)
            elif gold is None or not str(gold).strip():
                results[i] = Grade.of(WRONG)
            else:
                todo.append(i)
        todo.reverse()
        while len(self._workers) < min(self.processes, len(todo)):
            self._workers.append(_Worker(self.timeout_s))
        sel = selectors.DefaultSelector()
        for w in self._workers:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        try:
            pending = len(todo)
            while pending:
                for w in self._workers:
                    if w.ready and w.task is None and todo:
                        i = todo.pop()
                        w.send(i, items[i][0], str(items[i][1]))
                now = time.monotonic()
                busy = [w.started + self.timeout_s + _GRACE_S - now for w in self._workers if w.task is not None]
                wait = max(0.0, min(busy)) if busy else 60.0
                for key, _ in sel.select(timeout=wait):
                    w = key.data
                    line = w.proc.stdout.readline()
                    if not line:  # died
                        if not w.ready:
                            raise OpdkitError(f"a grading worker failed to start ({w.failure()}); is "
                                               "math-verify installed? pip install math-verify")
                        if w.task is not None:
                            results[w.task] = Grade.of(ERROR)
                            pending -= 1
                        self._replace(w, sel)
                        continue
                    msg = json.loads(line)
                    if msg == "ready":
                        w.ready = True
                    elif w.task is not None and msg[0] == w.task:
                        results[w.task] = Grade.of(msg[1])
                        w.task = None
                        pending -= 1
                now = time.monotonic()
                for w in list(self._workers):
                    if w.task is not None and now - w.started > self.timeout_s + _GRACE_S:
                        results[w.task] = Grade.of(TIMEOUT)
                        pending -= 1
                        self._replace(w, sel)
        finally:
            sel.close()
        return results  # type: ignore[return-value]

    def _replace(self, w: _Worker, sel) -> None:
        sel.unregister(w.proc.stdout)
        w.kill()
        self.replaced += 1
        fresh = _Worker(self.timeout_s)
        self._workers[self._workers.index(w)] = fresh
        sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)


# Grades from threads other than the main one go to single-worker pools, one per concurrent call (at most
# _THREAD_WORKERS at once), so that threads grading at the same time do not wait for each other.
_THREAD_WORKERS = max(2, min(8, os.cpu_count() or 2))
_slots = threading.BoundedSemaphore(_THREAD_WORKERS)
_idle: list[GradingPool] = []
_idle_lock = threading.Lock()


def _grade_off_main_thread(answer: str, gold: str, timeout_s: float) -> Grade:
    with _slots:
        with _idle_lock:
            pool = next((p for p in _idle if p.timeout_s == float(timeout_s)), None)
            if pool is not None:
                _idle.remove(pool)
        if pool is None:
            pool = GradingPool(1, timeout_s=timeout_s)
        try:
            return pool.grade_answers([(answer, gold)])[0]
        finally:
            with _idle_lock:
                _idle.append(pool)
                while len(_idle) > _THREAD_WORKERS:  # pools of other time limits, no longer used
                    _idle.pop(0).close()


def grade_many(
    items: Sequence[tuple[str, str]], *, processes: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S, fallbacks=(),
    min_parallel: int = 32,
) -> list[Grade]:
    """Grade ``(response, gold)`` pairs: in this process when there are fewer than ``min_parallel`` (or
    ``processes`` <= 1 in a main thread), else in a :class:`GradingPool` of ``processes`` workers."""
    fallbacks = check_fallbacks(fallbacks)
    if (processes <= 1 or len(items) < min_parallel) and _timer_free():
        return [grade_answer(extract_answer(r, fallbacks), g, timeout_s=timeout_s) for r, g in items]
    with GradingPool(max(1, processes), timeout_s=timeout_s, fallbacks=fallbacks) as pool:
        return pool.grade(items)
