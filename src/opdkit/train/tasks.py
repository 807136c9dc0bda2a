"""Which records a training step takes: one task's batch per step (multi-task), in a seeded order per task.

With several tasks (``data.train_path`` sources or the lines' ``task`` fields), each step's batch comes
from one task, chosen by ``data.task_sampling``:

- ``round_robin``: step ``s`` takes task ``s mod n`` (tasks in order of first appearance), as the paper
  alternates ALFWorld and math batches;
- ``weighted``: step ``s`` draws its task with probability proportional to ``data.task_weights``, from a
  generator seeded by ``(run.seed, s)``;
- ``mixed``: the tasks' records are pooled and batches drawn from the pool (one group; every record must be
  the same kind: prompts, or environments).

Inside a group the records come in a seeded permutation per epoch, and a counter per group is the data
position, so a resumed run takes exactly the records the interrupted one would have. The task of a step is
a function of the step alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from opdkit.errors import OpdkitError

__all__ = ["ALL", "TaskSchedule", "prompt_order"]

ALL = "*"  # the one group of a single-task or mixed run


def prompt_order(n_prompts: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The order of a group's records in one epoch."""
    if not shuffle:
        return list(range(n_prompts))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_prompts, generator=g).tolist()


class TaskSchedule:
    """The data order of a run (see the module docstring).

    Args:
        records: the training records (``PromptRecord``: prompts or environments).
        mode: ``data.task_sampling``; weights: ``data.task_weights`` as ``TASK=WEIGHT``.
        seed: ``run.seed``; shuffle: ``data.shuffle``.
    """

    def __init__(self, records: Sequence, *, mode: str = "round_robin", weights: Sequence[str] = (), seed: int = 0,
                 shuffle: bool = True):
        self.records, self.seed, self.shuffle = list(records), int(seed), bool(shuffle)
        tasks = list(dict.fromkeys(r.task for r in self.records))
        self.tasks = tasks
        self.mode = mode if len(tasks) > 1 else "mixed"
        if self.mode == "mixed":
            kinds = {r.env is not None for r in self.records}
            if len(kinds) > 1 and len(tasks) == 1:
                raise OpdkitError(f"task {tasks[0]!r} has both prompts and environments; give each kind its own "
                                  "task (TASK=SOURCE in data.train_path)")
            if len(kinds) > 1:
                raise OpdkitError("data.task_sampling=mixed: the training data has both prompts and environments; "
                                  "a batch holds one kind: use round_robin or weighted")
            self.groups = {ALL: list(range(len(self.records)))}
        else:
            self.groups = {t: [i for i, r in enumerate(self.records) if r.task == t] for t in tasks}
            for t, idx in self.groups.items():
                if len({self.records[i].env is not None for i in idx}) > 1:
                    raise OpdkitError(f"task {t!r} has both prompts and environments; give each kind its own task")
        self.weights = self._weights(weights) if self.mode == "weighted" else None

    def _weights(self, specs: Sequence[str]) -> list[float]:
        given = {}
        for spec in specs:
            name, sep, value = str(spec).partition("=")
            try:
                w = float(value)
            except ValueError:
                w = float("nan")
            if not sep or not w > 0 or w == float("inf"):
                raise OpdkitError(f"data.task_weights: {spec!r}: expected TASK=WEIGHT with a weight > 0")
            if name not in self.tasks:
                raise OpdkitError(f"data.task_weights: {name!r} is not a task of the training data (tasks: "
                                  f"{', '.join(map(str, self.tasks))})")
            given[name] = w
        missing = [t for t in self.tasks if t not in given]
        if missing:
            raise OpdkitError(f"data.task_weights: no weight for task(s) {', '.join(map(str, missing))}")
        return [given[t] for t in self.tasks]

    @property
    def multitask(self) -> bool:
        return self.mode != "mixed"

    def group_of_step(self, step: int) -> str | None:
        """The group (task name, or :data:`ALL`) that step ``step`` (0-based) takes its batch from."""
        if self.mode == "mixed":
            return ALL
        if self.mode == "round_robin":
            return self.tasks[step % len(self.tasks)]
        g = torch.Generator().manual_seed(self.seed * 7_919 + step * 104_729 + 13)
        return self.tasks[int(torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), 1, generator=g))]

    def take(self, step: int, counters: dict, n: int) -> tuple[list, list[int], dict]:
        """Step ``step``'s ``n`` records, their data positions (the group's counter values) and the new counters
        (``counters``: group -> records taken so far; not modified)."""
        group = self.group_of_step(step)
        idx = self.groups[group]
        key = ALL if group == ALL else str(group)
        start = int(counters.get(key, 0))
        task_seed = self.seed if group == ALL else self.seed + zlib.crc32(str(group).encode())
        out, positions, order_cache = [], [], {}
        for pos in range(start, start + n):
            epoch, i = divmod(pos, len(idx))
            if epoch not in order_cache:
                order_cache[epoch] = prompt_order(len(idx), epoch, task_seed, self.shuffle)
            out.append(self.records[idx[order_cache[epoch][i]]])
            positions.append(pos)
        return out, positions, {**counters, key: start + n}
