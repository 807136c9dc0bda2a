"""The environment protocol: what a multi-turn task looks like to opdkit's rollouts, trainer and evaluation.

An environment is single-use: ``reset()`` starts its one episode and returns the first observation (text);
``step(action)`` plays the student's reply (its whole text: a game takes its command with :func:`command_of`, a
single-turn problem grades all of it) and returns ``(observation, reward, done, info)``; when ``done``,
``info["won"]`` says whether the episode succeeded. An action the game does not understand gets the game's
own reply (``"I don't understand that"``...) and the episode goes on: it is the student's to learn.

Environments are described by an :class:`EnvSpec` (a kind and its JSON-able arguments, e.g. a game file),
so that they can be built in a worker process (:mod:`opdkit.envs.pool`) and written in a data file (one
JSON object per line, see :mod:`opdkit.envs.data`). How an observation becomes the student's chat turn is
the task's :class:`PromptTemplate`.

Only the standard library is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from opdkit.errors import OpdkitError

__all__ = ["EnvError", "EnvSpec", "Environment", "PromptTemplate", "StepResult", "command_of", "register_env",
           "template_from_config", "make_env", "check_spec", "ENV_KINDS"]


class EnvError(OpdkitError):
    """An environment cannot be built or played (missing game file or data, bad arguments)."""


def command_of(reply: str) -> str:
    """The command in a student's reply to a text game: after a ``</think>`` block if there is one, the first
    non-empty line, stripped (a game takes one command per turn)."""
    if "</think>" in reply:
        reply = reply.rsplit("</think>", 1)[1]
    for line in reply.splitlines():
        if line.strip():
            return line.strip()
    return ""


@runtime_checkable
class Environment(Protocol):
    """A single-use environment (one episode)."""

    def reset(self) -> str:
        """Start the episode; the first observation."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Play ``action``; ``(observation, reward, done, info)``, with ``info["won"]`` (bool) once done."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StepResult:
    """One ``step``'s outcome as it crosses a process boundary."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvSpec:
    """What to build: ``kind`` (a registered environment, e.g. ``"textworld"``) and its keyword arguments
    (JSON-able: paths, numbers, strings); ``task`` names the task it belongs to (metrics are kept per task)."""

    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)
    task: str | None = None

    def describe(self) -> str:
        first = next(iter(self.args.values()), None)
        return f"{self.kind}({first})" if first is not None else self.kind


@dataclass(frozen=True)
class PromptTemplate:
    """How an episode is shown to the student: an optional system message, the first user message built from
    the first observation, and every later observation as a user message.

    ``first`` and ``later`` are ``str.format`` templates with ``{observation}`` (and any key of the
    environment's ``info`` that the template names, e.g. ``{admissible_commands}``)."""

    system: str | None = None
    first: str = "{observation}"
    later: str = "{observation}"

    def render(self, observation: str, info: Mapping[str, Any], *, first: bool) -> str:
        fields = {k: v for k, v in info.items() if isinstance(v, (str, int, float))}
        try:
            return (self.first if first else self.later).format(observation=observation, **fields)
        except KeyError as exc:
            raise EnvError(f"prompt template names {{{exc.args[0]}}}, which the environment does not give "
                           f"(it gives: observation, {', '.join(sorted(fields)) or 'nothing else'})") from None


def template_from_config(env_cfg) -> PromptTemplate:
    """The episodes' template from the ``env`` config section: its system prompt; every observation as the user
    turn, followed by the admissible commands when ``env.admissible_commands``."""
    tail = "\nAdmissible commands: {admissible_commands}" if env_cfg.admissible_commands else ""
    return PromptTemplate(system=env_cfg.system_prompt or None, first="{observation}" + tail,
                          later="{observation}" + tail)


_REGISTRY: dict[str, str] = {
    # kind -> "module:factory"; imported only when an environment of that kind is built
    "textworld": "opdkit.envs.textworld:TextWorldEnv",
    "alfworld": "opdkit.envs.alfworld:ALFWorldEnv",
    "scripted": "opdkit.envs.scripted:ScriptedEnv",
    "problem": "opdkit.envs.problem:ProblemEnv",
}
ENV_KINDS = tuple(_REGISTRY)


def register_env(kind: str, target: str) -> None:
    """Register an environment class or factory under ``kind`` as ``"module:attribute"`` (importable in a
    worker process)."""
    _REGISTRY[kind] = target


def _factory(kind: str):
    """The class or factory registered under ``kind`` (imported on use; ``EnvError`` if unknown)."""
    import importlib

    target = _REGISTRY.get(kind)
    if target is None:
        raise EnvError(f"environment kind {kind!r} is unknown (known: {', '.join(sorted(_REGISTRY))})")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_env(spec: EnvSpec) -> Environment:
    """Build the environment ``spec`` describes (``EnvError`` for an unknown kind or bad arguments)."""
    factory = _factory(spec.kind)
    try:
        return factory(**dict(spec.args))
    except TypeError as exc:
        raise EnvError(f"environment {spec.kind}: bad arguments {dict(spec.args)!r} ({exc})") from None


def check_spec(spec: EnvSpec) -> None:
    """Build ``spec``'s environment and close it without playing: its arguments (names, values, game file)
    are checked where a data line is read, not when a worker first starts the game (``EnvError``).

    The built-in environments' constructors only check their arguments; a game starts at ``reset``.
    """
    import inspect

    factory = _factory(spec.kind)
    try:
        inspect.signature(factory).bind(**dict(spec.args))
    except TypeError as exc:
        params = [n for n, p in inspect.signature(factory).parameters.items() if p.kind is not p.VAR_KEYWORD]
        raise EnvError(f"environment {spec.kind}: {exc} (its arguments: {', '.join(params)})") from None
    try:
        env = make_env(spec)
    except (TypeError, ValueError) as exc:  # a constructor's own conversion of a bad value (int("x"))
        raise EnvError(f"environment {spec.kind}: bad arguments {dict(spec.args)!r} ({exc})") from None
    env.close()
