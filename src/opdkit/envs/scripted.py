"""A small deterministic environment: a fixed sequence of goal actions (for tests, examples and debugging).

The episode is won when the goal actions have been played in order (other actions in between are allowed
and answered with ``replies`` or the default reply); it ends when won or after ``max_steps`` actions. It can
also be told to misbehave, to exercise the worker pool: ``raise_on`` raises, ``hang_on`` never answers,
``exit_on`` kills its process, each when the action equals it (``"*"``: any action).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opdkit.envs.base import command_of

__all__ = ["ScriptedEnv"]


def _hits(trigger: str | None, action: str) -> bool:
    """Whether a misbehaviour set for ``trigger`` happens on ``action`` (``"*"``: on every action)."""
    return trigger is not None and (trigger == "*" or trigger == action)


class ScriptedEnv:
    def __init__(self, first: str, goal: Sequence[str], *, replies: Mapping[str, str] | None = None,
                 default_reply: str = "Nothing happens.", win_reply: str = "You won!", max_steps: int = 10,
                 raise_on: str | None = None, hang_on: str | None = None, exit_on: str | None = None,
                 admissible: Sequence[str] | None = None):
        self.first, self.goal = str(first), [str(g) for g in goal]
        self.replies = dict(replies or {})
        self.default_reply, self.win_reply = default_reply, win_reply
        self.max_steps = int(max_steps)
        self.raise_on, self.hang_on, self.exit_on = raise_on, hang_on, exit_on
        self.admissible = list(admissible) if admissible is not None else None
        self.progress = self.steps = 0
        self.last_info: dict[str, Any] = {}

    def _info(self, won: bool) -> dict[str, Any]:
        info: dict[str, Any] = {"won": won, "progress": self.progress}
        if self.admissible is not None:
            info["admissible_commands"] = ", ".join(self.admissible)
        return info

    def reset(self) -> str:
        self.progress = self.steps = 0
        self.last_info = self._info(False)
        return self.first

    def step(self, action: str):
        action = command_of(action)
        if _hits(self.raise_on, action):
            raise RuntimeError(f"scripted failure on {action!r}")
        if _hits(self.hang_on, action):
            time.sleep(10**6)
        if _hits(self.exit_on, action):
            os._exit(3)
        self.steps += 1
        if self.progress < len(self.goal) and action == self.goal[self.progress]:
            self.progress += 1
        won = self.progress == len(self.goal)
        obs = self.win_reply if won else self.replies.get(action, self.default_reply)
        info = self._info(won)
        self.last_info = info
        return obs, float(won), won or self.steps >= self.max_steps, info

    def close(self) -> None:
        pass
