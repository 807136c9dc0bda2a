"""ALFWorld's text games (household tasks in TextWorld's PDDL engine) as opdkit environments.

ALFWorld's ``AlfredTWEnv`` plays each ``game.tw-pddl`` file (a JSON file holding the PDDL domain, the
problem and a TextWorld text grammar, with the task sentence already written in) through TextWorld's
``PddlEnv``, wrapped so that the PDDL object ids (``apple_bar__minus_01_dot_20_bar_...``) read as
``apple 1``. This module does the same with TextWorld alone (its ``pddl`` extra, which brings the
``fast-downward-textworld`` planner library) and a small re-implementation of ALFWorld's name demangler,
so that the ``alfworld`` package (and its vision/training stack) is not needed to play. The data is
ALFWorld's: ``pip install alfworld && alfworld-download`` on a machine with internet access, then point
``ALFWORLD_DATA`` at the folder it filled (``~/.cache/alfworld`` by default).

The observations are ALFWorld's, with the TextWorld banner removed::

    You are in the middle of a room. Looking quickly around you, you see a cabinet 2, a cabinet 1, ...

    Your task is to: put some apple on diningtable.

A command the game does not know (or that is not possible now) gets ``"Nothing happens."``.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opdkit.envs.base import EnvError, command_of

__all__ = ["ALFWorldEnv", "TASK_TYPES", "SPLITS", "alfworld_data_root", "list_alfworld_games", "task_type_of",
           "success_by_task_type", "alfworld_names"]

# ALFWorld's six task types (alfred_tw_env.TASK_TYPES); a task folder is named "<task type>-<object>-...".
TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
# The folders under $ALFWORLD_DATA/json_2.1.1: ALFWorld trains on train, evaluates in distribution on
# valid_seen (some of its configs use valid_train, a sample of train games, instead) and out of distribution on
# valid_unseen.
SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
DATA_VARIABLE = "ALFWORLD_DATA"
GAMES_FOLDER = "json_2.1.1"
GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"

_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_HOW_TO_GET_DATA = (f"get the data with `pip install alfworld && alfworld-download` on a machine with internet "
                    f"access (it fills ~/.cache/alfworld, or the folder given by --data-dir), copy that folder "
                    f"here if needed and set {DATA_VARIABLE}=<that folder> (or pass its path in the config)")
# How ALFRED ids escape the characters PDDL names cannot hold ("Apple|-01.20|+00.90" -> "Apple_bar__minus_01...").
_ESCAPES = (("_bar_", "|"), ("_minus_", "-"), ("_plus_", "+"), ("_dot_", "."), ("_comma_", ","))


def alfworld_data_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The ALFWorld data folder (the one holding ``json_2.1.1``): ``path``, else ``$ALFWORLD_DATA``.

    There is no silent default: games found in some unexpected place would make results hard to trace."""
    given = path if path is not None else os.environ.get(DATA_VARIABLE) or None
    if given is None:
        raise EnvError(f"ALFWorld data not found: no path was given and {DATA_VARIABLE} is not set; "
                       f"{_HOW_TO_GET_DATA}")
    root = Path(given).expanduser()
    source = "the given path" if path is not None else DATA_VARIABLE
    if not root.is_dir():
        raise EnvError(f"ALFWorld data not found: {root} ({source}) is not a folder; {_HOW_TO_GET_DATA}")
    games = root / GAMES_FOLDER
    if not games.is_dir() or not any(games.glob(f"*/*/*/{GAME_FILE}")):
        raise EnvError(f"ALFWorld data not found: {root} ({source}) holds no games (looked for "
                       f"{games}/<split>/<task>/<trial>/{GAME_FILE}); {_HOW_TO_GET_DATA}")
    return root


def list_alfworld_games(split: str, root: str | os.PathLike[str] | None = None, *,
                        solvable_only: bool = True) -> list[str]:
    """The game files of ``split`` (``train``, ``valid_seen``, ``valid_unseen``, ``valid_train``), sorted.

    Kept are the trial folders that hold both ``game.tw-pddl`` and ``traj_data.json``, filtered the way
    ALFWorld's ``AlfredTWEnv.collect_game_files`` does: no path containing ``movable`` or ``Sliced``
    (movable receptacles and sliced objects are not supported by its text engine), one of the six task
    types, and (``solvable_only``) a game file marked ``"solvable": true`` by ``alfworld-generate``
    (reading each game file; ALFWorld skips files without that mark too)."""
    if split not in SPLITS:
        raise EnvError(f"unknown ALFWorld split {split!r} (known: {', '.join(SPLITS)})")
    folder = alfworld_data_root(root) / GAMES_FOLDER / split
    if not folder.is_dir():
        raise EnvError(f"ALFWorld split {split!r}: {folder} is not a folder; {_HOW_TO_GET_DATA}")
    games = []
    for game in folder.glob(f"*/*/{GAME_FILE}"):
        trial = game.parent
        within = str(trial.relative_to(folder))  # (not the data root's own path, which may hold any word)
        if not (trial / TRAJ_FILE).is_file() or "movable" in within or "Sliced" in within:
            continue
        if _task_type_or_none(game) is None:
            continue
        if solvable_only and not _is_solvable(game):
            continue
        games.append(str(game))
    if not games:
        raise EnvError(f"ALFWorld split {split!r}: no playable games in {folder} (looked for "
                       f"<task>/<trial>/{GAME_FILE} next to {TRAJ_FILE}, task folder named after one of "
                       f"{', '.join(TASK_TYPES)}" + (", marked solvable" if solvable_only else "") + ")")
    return sorted(games)


def _is_solvable(game: Path) -> bool:
    try:
        with open(game, encoding="utf-8") as f:
            return json.load(f).get("solvable") is True
    except (OSError, ValueError, AttributeError) as exc:
        raise EnvError(f"ALFWorld game file {game} cannot be read as JSON ({exc})") from None


def _task_type_or_none(game_file: str | os.PathLike[str]) -> str | None:
    for part in reversed(Path(game_file).parts):
        prefix = part.split("-", 1)[0]
        if prefix in TASK_TYPES:
            return prefix
    return None


def task_type_of(game_file: str | os.PathLike[str]) -> str:
    """The ALFWorld task type of a game, from its task folder's name (``pick_heat_then_place_in_recep-Egg-
    None-Fridge-1/trial_.../game.tw-pddl`` -> ``pick_heat_then_place_in_recep``), as ALFWorld's evaluations
    break results down."""
    task_type = _task_type_or_none(game_file)
    if task_type is None:
        raise EnvError(f"no ALFWorld task type in the path {game_file} (expected a folder named "
                       f"'<task type>-...' with a task type among {', '.join(TASK_TYPES)})")
    return task_type


def success_by_task_type(results: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Success rate per task type (and ``"all"``) from ``(game file or task type, won)`` pairs; task types
    without results are left out rather than shown as 0."""
    wins: dict[str, list[bool]] = defaultdict(list)
    for game, won in results:
        task_type = game if game in TASK_TYPES else task_type_of(game)
        wins[task_type].append(bool(won))
        wins["all"].append(bool(won))
    rates = {t: sum(wins[t]) / len(wins[t]) for t in TASK_TYPES if wins[t]}
    if wins["all"]:
        rates["all"] = sum(wins["all"]) / len(wins["all"])
    return rates


def alfworld_names(ids: Iterable[str]) -> dict[str, str]:
    """Readable names for a game's PDDL object ids, numbered the way ALFWorld numbers them (so that
    ``cabinet 3`` here is ``cabinet 3`` in ALFWorld's walkthroughs and published prompts).

    An id is ``<Type>|<x>|<y>|<z>[|<part>]`` with its characters escaped (``_bar_`` for ``|``...); the name
    is the type, plus ``basin`` for sink and bathtub basins, and a number per type: the ids of a type,
    sorted, count down from the number of instances to 1. Ids without ``|`` (the agent, the type
    constants, which the text never shows) keep their text."""
    ids = sorted(ids)
    kinds: dict[str, str] = {}
    for id_ in ids:
        text = id_
        for code, char in _ESCAPES:
            text = text.replace(code, char)
        kind, bar, _ = text.partition("|")
        if bar:
            kinds[id_] = kind + "basin" if "basin" in id_ else kind
    left = defaultdict(int)
    for kind in kinds.values():
        left[kind] += 1
    names = {}
    for id_ in ids:
        if id_ in kinds:
            names[id_] = f"{kinds[id_]} {left[kinds[id_]]}"
            left[kinds[id_]] -= 1
        else:
            names[id_] = id_
    return names


def _clean(text: str) -> str:
    text = text.strip()
    if text.startswith(_BANNER):
        text = text[len(_BANNER):].lstrip()
    return text


class ALFWorldEnv:
    """One episode of an ALFWorld text game (``.../<task type>-.../<trial>/game.tw-pddl``).

    ``done`` once the task is done (``info["won"]`` true, reward 1) or after ``max_steps`` commands
    (every command counts, also those that change nothing). ``info`` holds ``won``, ``task_type`` and,
    with ``admissible_commands``, the commands possible now joined by ``", "`` (ALFWorld's usual hint)."""

    def __init__(self, game_file: str, max_steps: int = 50, admissible_commands: bool = True) -> None:
        path = Path(game_file).expanduser()
        if not path.is_file():
            raise EnvError(f"ALFWorld game file {path} does not exist (expected a {GAME_FILE} file inside a "
                           f"task folder from {DATA_VARIABLE}/{GAMES_FOLDER}; list them with "
                           f"list_alfworld_games)")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise EnvError(f"ALFWorld max_steps must be a positive integer, not {max_steps!r}")
        self.game_file = str(path)
        self.task_type = task_type_of(path)
        self.max_steps = max_steps
        self.admissible_commands = admissible_commands
        self._env: Any = None
        self._steps = 0
        self._done = False
        self.last_info: dict[str, Any] = {}  # the info of the last observation, reset()'s included

    def reset(self) -> str:
        self.close()
        self._env, state = self._start()
        self._steps, self._done = 0, False
        self.last_info = self._info(state)
        return _clean(state.feedback or "")

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._env is None:
            raise EnvError(f"ALFWorld game {self.game_file}: step() before reset() (or after close())")
        if self._done:
            raise EnvError(f"ALFWorld game {self.game_file}: step() after the episode ended")
        # one command per turn: the reply's first line after any </think> (opdkit.envs.base.command_of)
        command = command_of(action)
        state, _, _ = self._env.step(command)
        self._steps += 1
        won = bool(state["won"])
        self._done = won or self._steps >= self.max_steps
        self.last_info = self._info(state)
        return _clean(state.feedback or ""), 1.0 if won else 0.0, self._done, self.last_info

    def close(self) -> None:
        """Close the game. Its copy of the planner library stays loaded: unloading it (fast_downward.close_lib)
        made the Python process crash at exit (segmentation fault, measured), and a crash at exit fails a test
        run; a worker keeps ~1 MiB per game played."""
        env, self._env = self._env, None
        if env is not None:
            _unload(env)

    @property
    def walkthrough(self) -> list[str] | None:
        """The expert's winning commands that ``alfworld-generate`` stored in the game file (None if absent)."""
        with open(self.game_file, encoding="utf-8") as f:
            return json.load(f).get("walkthrough")

    def _info(self, state: Any) -> dict[str, Any]:
        info: dict[str, Any] = {"won": bool(state["won"]), "task_type": self.task_type}
        if self.admissible_commands:
            info["admissible_commands"] = ", ".join(state["admissible_commands"] or [])
        return info

    def _start(self) -> tuple[Any, Any]:
        """Load the game in TextWorld's PDDL engine, name its objects as ALFWorld does, start the episode."""
        try:
            import textworld
            from textworld.envs.pddl import pddl as tw_pddl
        except ImportError as exc:
            raise EnvError(f"ALFWorld games need TextWorld with its PDDL engine: pip install 'textworld[pddl]' "
                           f"({exc})") from None
        if tw_pddl.fast_downward_missing:
            raise EnvError("ALFWorld games need TextWorld's PDDL planner: pip install 'textworld[pddl]' (it "
                           "builds fast-downward-textworld from source: needs cmake and a C++ compiler)")
        env = tw_pddl.PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))
        try:
            self._guarded(env.load, self.game_file)
            names = alfworld_names(env._entity_infos)
            for id_, info in env._entity_infos.items():
                info.name = names[id_]
            return env, self._guarded(env.reset)
        # a bad game is this episode's failure, not the process's: the PDDL translator raises SystemExit
        except (Exception, SystemExit) as exc:
            _unload(env)
            raise EnvError(f"ALFWorld game file {self.game_file} cannot be played (expected TextWorld PDDL game "
                           f"JSON: pddl_domain, grammar with the task, pddl_problem): {type(exc).__name__}: "
                           f"{exc}") from None

    @staticmethod
    def _guarded(call: Any, *args: Any) -> Any:
        # fast_downward's PDDL translator overwrites sys.argv when a game is loaded or reset
        argv = list(sys.argv)
        try:
            return call(*args)
        finally:
            sys.argv[:] = argv


def _unload(env: Any) -> None:
    env.close()
