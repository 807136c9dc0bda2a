"""TextWorld games as opdkit environments, and TextWorld's own generator to make them offline.

:class:`TextWorldEnv` plays one compiled game (``.z8`` or ``.ulx`` with its ``.json`` beside it, as
``tw-make`` or :func:`make_games` write them). Observations are cleaned for a language model: the ASCII
banner, the ``>`` prompt line and its status bar are removed and blank lines collapsed. Success = the game
is won (its quest done) within ``max_steps`` actions. With ``admissible_commands=True``, ``info`` (and so
the prompt template, as ``{admissible_commands}``) lists the commands the game accepts in this state.

:func:`make_games` generates ``n`` games with ``textworld.generator`` at a difficulty (rooms, objects,
quest length) and a split: train and test games come from disjoint seed ranges, so held-out games are
never trained on. Generating and compiling a game takes ~3 s on one core (Inform 7 ships with TextWorld).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.envs.base import EnvError, command_of

__all__ = ["DIFFICULTIES", "Difficulty", "TextWorldEnv", "clean_observation", "make_games", "game_seed",
           "safe_command"]



def clean_observation(text: str) -> str:
    """TextWorld's text without the title art, the ``>`` prompt (and status bar) lines, or runs of blank lines."""
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(">") or "$$" in s or (s and all(c in " _|\\/$" for c in s)):  # prompt; title art
            continue
        lines.append(s)
    return re.sub(r"\n{2,}", "\n", "\n".join(lines)).strip()


META_REPLY = "That command is not available in this game."
GAME_SUFFIXES = (".z8", ".ulx")  # what TextWorld compiles a game to (the .json beside it holds its metadata)
# Commands of the Z-machine interpreter rather than of the game: they ask a yes/no question or a file name
# and leave the game waiting; "\..." is a frotz meta-command, which loops forever on an unknown one.
_META = {"save", "restore", "restart", "quit", "q", "undo", "script", "unscript", "transcript", "verify",
         "version", "noscript", "superbrief", "verbose", "brief"}


def safe_command(command: str) -> str | None:
    """``command`` as the interpreter may safely read it: printable ASCII only (other characters dropped), no
    backslash, at most 200 characters; None for an interpreter command (save, restart, quit, undo, ...)."""
    text = "".join(c for c in command if 32 <= ord(c) < 127 and c != "\\")[:200].strip()
    first = text.split(" ", 1)[0].lower() if text else ""
    return None if first in _META else text


def _import_textworld():
    try:
        import textworld
    except ImportError:
        raise EnvError("TextWorld is not installed: pip install textworld (make install does it)") from None
    return textworld


class TextWorldEnv:
    """One episode of a compiled TextWorld game (see the module docstring).

    Args:
        game_file: the ``.z8`` / ``.ulx`` game; its ``.json`` must sit beside it.
        max_steps: the episode ends (not won) after this many actions.
        admissible_commands: give ``info["admissible_commands"]`` (", "-joined) at every observation.
        expert: give ``info["expert_commands"]``, the rest of a winning walkthrough from this state (for
            building demonstrations; TextWorld recomputes it after every action).
    """

    def __init__(self, game_file: str, max_steps: int = 20, admissible_commands: bool = False,
                 expert: bool = False):
        path = Path(game_file)
        if not path.is_file():
            raise EnvError(f"TextWorld game '{game_file}': no such file")
        if path.suffix not in GAME_SUFFIXES:
            raise EnvError(f"TextWorld game '{game_file}': expected a compiled game ({', '.join(GAME_SUFFIXES)}), "
                           f"not a {path.suffix or 'suffix-less'} file")
        if not path.with_suffix(".json").is_file():
            raise EnvError(f"TextWorld game '{game_file}': its {path.with_suffix('.json').name} is missing (TextWorld "
                           "writes it beside the compiled game; it holds the game's commands and quest)")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise EnvError(f"TextWorld game '{game_file}': max_steps must be an integer >= 1, got {max_steps!r}")
        self.game_file, self.max_steps = str(path), max_steps
        self.admissible, self.expert = bool(admissible_commands), bool(expert)
        self._env = None
        self.steps = 0
        self.last_info: dict[str, Any] = {}

    def _info(self, state, *, won: bool) -> dict[str, Any]:
        info: dict[str, Any] = {"won": won, "score": state.get("score", 0), "max_score": state.get("max_score", 0)}
        if self.admissible:
            info["admissible_commands"] = ", ".join(state.get("admissible_commands") or [])
        if self.expert:
            info["expert_commands"] = list(state.get("policy_commands") or [])
        return info

    def reset(self) -> str:
        tw = _import_textworld()
        infos = tw.EnvInfos(admissible_commands=self.admissible, won=True, lost=True, score=True, max_score=True,
                            policy_commands=self.expert)
        if self._env is not None:
            self._env.close()
        with warnings.catch_warnings():
            # jericho: "not fully supported, score/move detection disabled": TextWorld tracks both itself
            warnings.filterwarnings("ignore", message=".*not fully supported.*")
            self._env = tw.start(self.game_file, request_infos=infos)
            state = self._env.reset()
        self._last_state = state
        self.steps = 0
        self.last_info = self._info(state, won=False)
        return clean_observation(state.feedback)

    def step(self, action: str):
        if self._env is None:
            raise EnvError("TextWorldEnv.step before reset")
        # one command per turn: the reply's first line after any </think> (opdkit.envs.base.command_of)
        command = safe_command(command_of(action))
        if command is None:  # an interpreter command (save, restart, ...) would leave the game waiting on a question
            self.steps += 1
            info = self._info(self._last_state, won=False) | {"lost": False}
            self.last_info = info
            return META_REPLY, 0.0, self.steps >= self.max_steps, info
        state, _score, done = self._env.step(command)
        self._last_state = state
        self.steps += 1
        won = bool(state.get("won"))
        info = self._info(state, won=won)
        info["lost"] = bool(state.get("lost"))
        self.last_info = info
        return clean_observation(state.feedback), float(won), bool(done) or won or self.steps >= self.max_steps, info

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


@dataclass(frozen=True)
class Difficulty:
    rooms: int
    objects: int
    quest_length: int


DIFFICULTIES = {
    "easy": Difficulty(rooms=1, objects=3, quest_length=1),
    "medium": Difficulty(rooms=2, objects=4, quest_length=2),
    "hard": Difficulty(rooms=3, objects=6, quest_length=3),
}
_SPLIT_OFFSET = {"train": 0, "test": 1_000_000}


def game_seed(seed: int, split: str, index: int) -> int:
    """The generator seed of game ``index`` of a split: train and test seeds never meet."""
    if split not in _SPLIT_OFFSET:
        raise EnvError(f"split must be one of {', '.join(_SPLIT_OFFSET)}, got {split!r}")
    return (int(seed) * 2_000_003 + _SPLIT_OFFSET[split] + int(index)) % (2**31 - 1)


def make_games(out_dir: str | Path, n: int, *, difficulty: str | Difficulty = "easy", split: str = "train",
               seed: int = 0, log=None, processes: int = 1) -> list[Path]:
    """Generate and compile ``n`` games into ``out_dir`` (``{split}-{i:04d}.z8`` + ``.json``); existing games of
    the same name are kept (generation is deterministic in the seed). ``difficulty``: a name of
    :data:`DIFFICULTIES` or a :class:`Difficulty`; ``processes``: games made in parallel. Returns the game files."""
    if isinstance(difficulty, str) and difficulty not in DIFFICULTIES:
        raise EnvError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if split not in _SPLIT_OFFSET:
        raise EnvError(f"split must be one of {', '.join(_SPLIT_OFFSET)}, got {split!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EnvError(f"'{out}' is a file, not a folder for games; give a folder (it is made if missing)")
    _import_textworld()
    d = DIFFICULTIES[difficulty] if isinstance(difficulty, str) else difficulty
    out.mkdir(parents=True, exist_ok=True)
    _record_games(out, split, {"seed": int(seed), "rooms": d.rooms, "objects": d.objects,
                               "quest_length": d.quest_length})
    files = [out / f"{split}-{i:04d}.z8" for i in range(n)]
    todo = [(i, str(p)) for i, p in enumerate(files) if not (p.is_file() and p.with_suffix(".json").is_file())]
    jobs = [(game_seed(seed, split, i), path, d.rooms, d.objects, d.quest_length) for i, path in todo]
    if processes > 1 and len(jobs) > 1:
        _make_in_subprocesses(jobs, processes, log)
    else:
        for job in jobs:
            path = _make_one(job)
            if log is not None:
                log(f"made {path}")
    return files


GAMES_RECORD = "opdkit-games.json"


def _record_games(out: Path, split: str, settings: dict) -> None:
    """Keep, per split, the seed and difficulty of the games in ``out`` (``GAMES_RECORD``): games already there
    are reused only when they were made with the same settings (``EnvError`` otherwise)."""
    import json

    path = out / GAMES_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as exc:
        raise EnvError(f"'{path}': not valid JSON ({exc}); delete it if the games there are yours to remake") from None
    old = record.get(split)
    if old is not None and old != settings:
        def say(x):
            return f"seed {x.get('seed')}, {x.get('rooms')} room(s), {x.get('quest_length')} action(s)"
        raise EnvError(f"'{out}' already holds {split} games made with {say(old)}; this asks for {say(settings)}. "
                       "Give another folder, or the same --seed and --difficulty")
    if old is None:
        record[split] = settings
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)


def _make_in_subprocesses(jobs, processes: int, log) -> None:
    """Each game in its own ``python -c`` subprocess, ``processes`` at a time (plain subprocesses, not
    multiprocessing: they work from scripts without a ``__main__`` guard, and never import torch)."""
    import json
    import subprocess
    import sys

    code = "import json, sys; from opdkit.envs.textworld import _make_one; _make_one(json.loads(sys.argv[1]))"
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < processes:
            job = pending.pop(0)
            running.append((job, subprocess.Popen([sys.executable, "-c", code, json.dumps(job)],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        job, proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            for _, other in running:
                other.kill()
            raise EnvError(f"TextWorld could not make the game {job[1]} (seed {job[0]}): {err.strip()[-500:]}")
        if log is not None:
            log(f"made {job[1]}")


def _make_one(job) -> str:
    """Generate and compile one game: ``(seed, path, rooms, objects, quest_length)``."""
    seed, path, rooms, objects, quest_length = job
    tw = _import_textworld()
    from textworld.generator import compile_game, make_game

    opts = tw.GameOptions()
    opts.seeds = seed
    opts.nb_rooms, opts.nb_objects, opts.quest_length = rooms, objects, quest_length
    opts.path = path
    opts.force_recompile = True
    opts.file_ext = ".z8"
    compile_game(make_game(opts), opts)
    return path
