"""Environments stepped in parallel worker processes, each call bounded by a time limit.

:class:`EnvPool` hosts a batch of episodes (episode ``k`` lives in worker ``k mod processes``). ``reset`` and
``step`` send every episode's request at once and collect the answers as they come: the workers run at the
same time, so one slow game delays only the episodes of its own worker. Every request has a deadline
(``timeout_s`` from when its worker starts it). An environment that raises ends its episode with a recorded
failure (``info["failure"]``); one that overruns has its worker killed: its episode ends with a ``timeout``
failure, and the other episodes of that worker are rebuilt in a fresh worker by replaying their actions
(environments are deterministic given their actions: TextWorld and ALFWorld games are). The batch goes on.

The workers are plain subprocesses (``python -m opdkit.envs.worker``) speaking JSON lines, like the grading
pool: they work from any context and never import torch. ``processes=0`` runs the environments in this
process instead (no time limit: for debugging and scripted tests).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from opdkit.envs.base import EnvError, EnvSpec, StepResult, make_env

__all__ = ["EnvPool", "failure_result"]

_READY_TIMEOUT_S = 120.0  # a worker's start: Python, then the environment modules (TextWorld: ~2 s)


def failure_result(reason: str) -> StepResult:
    """How an episode that failed (raised, overran, or its worker died) ends: done, not won, the reason."""
    return StepResult("", 0.0, True, {"won": False, "failure": reason})


class _Worker:
    def __init__(self, kinds: Sequence[str]):
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opdkit.envs.worker", *kinds], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            # what games print is noise, and an interpreter stuck in a loop can print without end: discarded
            # (an environment's errors come back through the protocol)
            stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env,
        )
        self.buf = ""
        self.busy: int | None = None  # the episode whose request is in flight
        self.deadline = 0.0
        self.queue: list[tuple[int, dict]] = []

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


@dataclass
class _Episode:
    spec: EnvSpec
    actions: list[str] = field(default_factory=list)
    done: bool = False


class EnvPool:
    """Episodes of a batch, stepped in ``processes`` worker processes (see the module docstring).

    Args:
        processes: worker processes (0: in this process, no time limit).
        timeout_s: time limit of one ``reset`` or ``step`` of one environment.
    """

    def __init__(self, processes: int = 2, timeout_s: float = 60.0):
        if not isinstance(processes, int) or processes < 0:
            raise EnvError(f"env.processes: expected an integer >= 0, got {processes!r}")
        if not timeout_s > 0:
            raise EnvError(f"env.step_timeout_s: expected a number > 0, got {timeout_s!r}")
        self.processes, self.timeout_s = processes, float(timeout_s)
        self.workers: list[_Worker | None] = [None] * processes
        self.kinds: set[str] = set()
        self.episodes: list[_Episode] = []
        self.local: dict[int, object] = {}
        self.restarts = 0

    # ------------------------------------------------------------------------------------------- public
    def reset(self, specs: Sequence[EnvSpec]) -> list[StepResult]:
        """Start one episode per spec (closing any previous batch); their first observations (``info`` holds
        what the environment gives with it, e.g. ``admissible_commands``)."""
        self.close_episodes()
        self.episodes = [_Episode(s) for s in specs]
        self.kinds |= {s.kind for s in specs}
        requests = {k: {"op": "reset", "id": k, "kind": s.kind, "args": dict(s.args)} for k, s in enumerate(specs)}
        return [results for _, results in sorted(self._run(requests).items())]

    def step(self, actions: Mapping[int, str]) -> dict[int, StepResult]:
        """Play ``actions[k]`` in episode ``k`` (episodes that are not done); their outcomes."""
        requests = {}
        for k, action in actions.items():
            ep = self.episodes[k]
            if ep.done:
                raise EnvError(f"episode {k} is over; it cannot be stepped")
            ep.actions.append(str(action))
            requests[k] = {"op": "step", "id": k, "action": str(action)}
        return self._run(requests)

    def close_episodes(self) -> None:
        """Close every environment of the current batch (workers stay up for the next)."""
        if self.processes == 0:
            for env in self.local.values():
                try:
                    env.close()
                except Exception:
                    pass
            self.local.clear()
        else:
            live = {k: {"op": "close", "id": k} for k, ep in enumerate(self.episodes) if not ep.done}
            if live:
                self._run(live, record=False)
        self.episodes = []

    def close(self) -> None:
        """Close the episodes and stop the workers."""
        try:
            self.close_episodes()
        finally:
            for w in self.workers:
                if w is not None:
                    w.kill()
            self.workers = [None] * self.processes

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ in-process
    def _run_local(self, requests: dict[int, dict], record: bool) -> dict[int, StepResult]:
        out = {}
        for k, req in requests.items():
            try:
                if req["op"] == "reset":
                    env = self.local[k] = make_env(EnvSpec(req["kind"], req["args"]))
                    obs = env.reset()
                    res = StepResult(str(obs), 0.0, False, dict(getattr(env, "last_info", None) or {}))
                elif req["op"] == "step":
                    obs, reward, done, info = self.local[k].step(req["action"])
                    res = StepResult(str(obs), float(reward), bool(done), dict(info or {}))
                else:
                    env = self.local.pop(k, None)
                    if env is not None:
                        env.close()
                    continue
            except Exception as exc:  # as in a worker: the environment's failure ends its episode only
                res = failure_result(f"error: {type(exc).__name__}: {str(exc)[:300]}")
            out[k] = self._record(k, res) if record else res
        return out

    # ---------------------------------------------------------------------------------- with workers
    def _record(self, k: int, res: StepResult) -> StepResult:
        if res.done:
            self.episodes[k].done = True
        return res

    def _worker(self, i: int) -> _Worker:
        w = self.workers[i]
        if w is None or w.proc.poll() is not None:
            w = self.workers[i] = _Worker(sorted(self.kinds))
            line = self._readline(w, time.monotonic() + _READY_TIMEOUT_S)
            if line != '"ready"':
                w.kill()
                self.workers[i] = None
                raise EnvError(f"an environment worker process did not start (python -m opdkit.envs.worker; "
                               f"it said {line!r})")
        return w

    def _readline(self, w: _Worker, deadline: float) -> str | None:
        """One line from ``w`` (blocking until ``deadline``); None on time-out or end of file."""
        sel = selectors.DefaultSelector()
        sel.register(w.proc.stdout, selectors.EVENT_READ)
        try:
            while "\n" not in w.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(w.proc.stdout.fileno(), 1 << 16).decode()
                if not chunk:
                    return None
                w.buf += chunk
        finally:
            sel.close()
        line, w.buf = w.buf.split("\n", 1)
        return line.strip()

    def _send(self, w: _Worker, k: int, req: dict) -> None:
        w.busy, w.deadline = k, time.monotonic() + self.timeout_s
        w.proc.stdin.write(json.dumps(req) + "\n")
        w.proc.stdin.flush()

    def _run(self, requests: dict[int, dict], record: bool = True) -> dict[int, StepResult]:
        if self.processes == 0:
            return self._run_local(requests, record)
        out: dict[int, StepResult] = {}
        for k, req in requests.items():
            self._worker(k % self.processes).queue.append((k, req))
        while True:
            active = [w for w in self.workers if w is not None and (w.busy is not None or w.queue)]
            if not active:
                return out
            for w in active:
                if w.busy is None:
                    k, req = w.queue.pop(0)
                    try:
                        self._send(w, k, req)
                    except OSError:  # the worker died between requests
                        w.queue.insert(0, (k, req))
                        self._replace(w, None, "", out, record)
            self._collect(out, record)

    def _collect(self, out: dict[int, StepResult], record: bool) -> None:
        """Wait for the first reply or deadline among busy workers, and handle it."""
        busy = [w for w in self.workers if w is not None and w.busy is not None]
        if not busy:
            return
        for w in busy:
            if "\n" in w.buf:
                self._handle(w, w.buf.split("\n", 1)[0], out, record)
                w.buf = w.buf.split("\n", 1)[1]
                return
        sel = selectors.DefaultSelector()
        for w in busy:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        try:
            first = min(w.deadline for w in busy)
            ready = sel.select(max(0.0, first - time.monotonic()))
        finally:
            sel.close()
        for key, _ in ready:
            w = key.data
            chunk = os.read(w.proc.stdout.fileno(), 1 << 16).decode()
            if not chunk:
                self._replace(w, w.busy, "error: the environment's worker process died", out, record)
                continue
            w.buf += chunk
            while "\n" in w.buf and w.busy is not None:
                line, w.buf = w.buf.split("\n", 1)
                self._handle(w, line, out, record)
        now = time.monotonic()
        for w in busy:
            if w.busy is not None and now >= w.deadline:
                self._replace(w, w.busy, f"timeout: no answer within env.step_timeout_s = {self.timeout_s:g} s", out,
                              record)

    def _handle(self, w: _Worker, line: str, out: dict[int, StepResult], record: bool) -> None:
        k, w.busy = w.busy, None
        try:
            reply = json.loads(line)
        except ValueError:
            reply = {"error": f"unreadable reply {line[:100]!r}"}
        if "error" in reply:
            res = failure_result(f"error: {reply['error']}")
        elif "observation" not in reply:  # a close
            return
        else:
            res = StepResult(reply["observation"], float(reply.get("reward", 0.0)), bool(reply.get("done", False)),
                             dict(reply.get("info") or {}))
        out[k] = self._record(k, res) if record else res

    def _replace(self, w: _Worker, failed: int | None, reason: str, out: dict[int, StepResult], record: bool) -> None:
        """Kill ``w``; episode ``failed`` ends with ``reason``; its worker's other live episodes are replayed in a
        fresh worker (their queued requests then run there)."""
        i = self.workers.index(w)
        queue = [(k, r) for k, r in w.queue if k != failed]
        w.kill()
        self.workers[i] = None
        self.restarts += 1
        if failed is not None:
            res = failure_result(reason)
            out[failed] = self._record(failed, res) if record else res
        pending = {k for k, _ in queue}
        replay = [k for k, ep in enumerate(self.episodes)
                  if k % self.processes == i and not ep.done and k != failed]
        while True:
            fresh, again = self._worker(i), False
            for k in list(replay):
                ep = self.episodes[k]
                # an episode with a step queued has that step's action recorded already: replay the ones before
                queued_step = k in pending and any(q == k and r["op"] == "step" for q, r in queue)
                status = self._replay(fresh, k, ep.spec, ep.actions[:-1] if queued_step else ep.actions)
                if status != "ok":
                    res = failure_result(f"{status}: could not rebuild the episode after its worker was restarted")
                    out[k] = self._record(k, res) if record else res
                    queue = [(q, r) for q, r in queue if q != k]
                    replay.remove(k)
                if status == "timeout":  # that worker is gone: rebuild the others again in a new one
                    again = True
                    break
            if not again:
                break
        fresh.queue = queue

    def _replay(self, w: _Worker, k: int, spec: EnvSpec, actions: list[str]) -> str:
        """Rebuild episode ``k`` in ``w``: ``"ok"``, ``"error"`` (it raised) or ``"timeout"`` (``w`` killed)."""
        reqs = [{"op": "reset", "id": k, "kind": spec.kind, "args": dict(spec.args)}]
        reqs += [{"op": "step", "id": k, "action": a} for a in actions]
        for req in reqs:
            self._send(w, k, req)
            line = self._readline(w, w.deadline)
            w.busy = None
            if line is None:
                w.kill()
                self.workers[self.workers.index(w)] = None
                self.restarts += 1
                return "timeout"
            if "error" in json.loads(line):
                return "error"
        return "ok"
