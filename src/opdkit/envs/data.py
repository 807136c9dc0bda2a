"""Environments in data files and data sources: which episodes a run trains and evaluates on.

A JSONL line with an ``"env"`` field is an environment, not a prompt::

    {"env": "textworld", "game": "games/train-0003.z8", "task": "textworld"}
    {"env": "alfworld", "game": "/data/alfworld/json_2.1.1/train/.../game.tw-pddl"}
    {"env": "scripted", "args": {"first": "A door.", "goal": ["open door"]}}

``env`` is the kind (:data:`opdkit.envs.base.ENV_KINDS`), ``args`` its keyword arguments, ``game`` the
shorthand for ``args.game_file`` (relative paths are relative to the data file's folder), ``task`` the task
it belongs to. Data sources (``data.train_path``, ``data.eval_path``) may also be ``textworld:DIR`` (every
compiled game in DIR) or ``alfworld:SPLIT`` (ALFWorld's games of that split), each optionally ``TASK=SOURCE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opdkit.data.jsonl import DataError
from opdkit.envs.base import _REGISTRY, EnvError, EnvSpec, check_spec

__all__ = ["env_defaults", "env_record", "env_source_records", "is_env_source"]


def env_defaults(env_cfg) -> dict[str, dict[str, Any]]:
    """The arguments every environment of a kind gets from the ``env`` config section (a data line's own
    ``args`` win)."""
    common = {"max_steps": int(env_cfg.max_turns), "admissible_commands": bool(env_cfg.admissible_commands)}
    return {"textworld": dict(common), "alfworld": dict(common)}


def env_record(obj: Mapping[str, Any], where: str, base_dir: Path, defaults: Mapping[str, Mapping[str, Any]]):
    """A ``PromptRecord`` holding an :class:`EnvSpec` from one data line (``DataError`` naming ``where``)."""
    from opdkit.data.prompts import PromptRecord

    kind = obj.get("env")
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise DataError(f"{where}: field 'env' must name an environment kind ({', '.join(sorted(_REGISTRY))}), "
                        f"got {kind!r}")
    unknown = set(obj) - {"env", "args", "game", "task"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} in an environment line (expected "
                        "env, args, game, task)")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise DataError(f"{where}: field 'args' must be an object of keyword arguments, got {type(args).__name__}")
    args = {**dict(defaults.get(kind, {})), **args}
    if "game" in obj:
        args["game_file"] = obj["game"]
    if "game_file" in args:
        game = Path(str(args["game_file"])).expanduser()
        game = game if game.is_absolute() else (base_dir / game)
        if not game.is_file():
            raise DataError(f"{where}: game file '{game}' does not exist")
        args["game_file"] = str(game.resolve())
    task = obj.get("task", kind)
    if not isinstance(task, str) or not task:
        raise DataError(f"{where}: field 'task' must be a non-empty string, got {task!r}")
    spec = EnvSpec(kind, args, task)
    try:
        check_spec(spec)
    except EnvError as exc:
        raise DataError(f"{where}: {exc}") from None
    return PromptRecord((), None, task, where, env=spec)


def is_env_source(source: str) -> bool:
    return source.startswith(("textworld:", "alfworld:"))


def env_source_records(source: str, task: str | None, defaults: Mapping[str, Mapping[str, Any]], *,
                       alfworld_data: str | None = None) -> list:
    """The environments of ``textworld:DIR`` or ``alfworld:SPLIT``, as ``PromptRecord``s of ``task``."""
    from opdkit.data.prompts import PromptRecord

    kind, _, rest = source.partition(":")
    if not rest.strip():
        raise EnvError(f"{source}: expected a folder (textworld:DIR) or a split (alfworld:SPLIT) after '{kind}:'")
    if kind == "textworld":
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise EnvError(f"{source}: no such folder of TextWorld games (make some with `opdkit envs make-games`)")
        games = sorted([*folder.glob("*.z8"), *folder.glob("*.ulx")])
        if not games:
            raise EnvError(f"{source}: no compiled TextWorld games (*.z8, *.ulx) in '{folder}' (make some with "
                           "`opdkit envs make-games`)")
        files = [str(g.resolve()) for g in games]
    elif kind == "alfworld":
        from opdkit.envs.alfworld import list_alfworld_games

        files = [str(g) for g in list_alfworld_games(rest, root=alfworld_data)]
    else:
        raise EnvError(f"{source}: expected textworld:DIR or alfworld:SPLIT")
    task = task or kind
    out = [PromptRecord((), None, task, f"{source} game {i} ({Path(f).name})",
                        env=EnvSpec(kind, {**dict(defaults.get(kind, {})), "game_file": f}, task))
           for i, f in enumerate(files)]
    for r in out:
        try:
            check_spec(r.env)
        except EnvError as exc:
            raise EnvError(f"{r.source}: {exc}") from None
    return out
