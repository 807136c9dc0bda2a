"""``opdkit envs``: make TextWorld games offline, and play a game by hand or by a list of commands."""

from __future__ import annotations

import argparse
import sys

from opdkit.errors import OpdkitError

__all__ = ["main_envs"]

DATA_HELP = """environments in data files (data.train_path, data.eval_path), one JSON object per line:
  {"env": "textworld", "game": "games/train-0003.z8"}            (a path relative to the data file)
  {"env": "alfworld", "game": "/data/alfworld/json_2.1.1/train/<task>/<trial>/game.tw-pddl"}
  {"env": "scripted", "args": {"first": "A door.", "goal": ["open door"]}, "task": "toy"}
or as a source: textworld:DIR (every game in DIR), alfworld:SPLIT (train, valid_seen, valid_unseen, valid_train;
the data folder is env.alfworld_data or $ALFWORLD_DATA), each optionally TASK=SOURCE. Episode settings: env.*
(`opdkit config --explain`)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opdkit envs", description="Text-game environments.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_HELP)
    sub = p.add_subparsers(dest="what", required=True, metavar="MODE")
    m = sub.add_parser("make-games", help="generate and compile TextWorld games offline",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_HELP,
                       description="Generate N TextWorld games with TextWorld's own generator into OUT "
                       "({split}-NNNN.z8, its .json, and TextWorld's Inform 7 source .ni). train and test games come "
                       "from disjoint seeds; games already there are kept when OUT's record (opdkit-games.json) says "
                       "they were made with the same difficulty and seed, refused otherwise. ~3 s per game on one "
                       "core.")
    m.add_argument("out", metavar="OUT", help="a folder (made if missing)")
    m.add_argument("--n", type=int, default=20, help="games to make (default 20)")
    m.add_argument("--difficulty", default="easy", choices=("easy", "medium", "hard"),
                   help="easy: 1 room, 1 action; medium: 2 rooms, 2 actions; hard: 3 rooms, 3 actions (default easy)")
    m.add_argument("--split", default="train", choices=("train", "test"), help="(default train)")
    m.add_argument("--seed", type=int, default=0, help="(default 0)")
    m.add_argument("--processes", type=int, default=1, help="games made in parallel (default 1)")
    sub.add_parser("play", add_help=False, help="play a game: by hand, or the given commands (see play --help)")
    return p


def _play_parser() -> argparse.ArgumentParser:
    """``play``'s own parser: parsed with ``parse_intermixed_args``, so flags may come between commands."""
    g = argparse.ArgumentParser(prog="opdkit envs play",
                                description="Play GAME (a .z8/.ulx TextWorld game or an ALFWorld game.tw-pddl) as "
                                "the student sees it (cleaned observations). Exit status 0 when the game is won, 1 "
                                "when it is not.")
    g.add_argument("game", metavar="GAME")
    g.add_argument("commands", nargs="*", metavar="COMMAND", help="commands to play (default: read them from stdin)")
    g.add_argument("--walkthrough", action="store_true", help="play the game's own winning walkthrough")
    g.add_argument("--max-steps", type=int, default=50, help="the game ends after this many commands (default 50)")
    return g


def main_envs(argv: list[str]) -> int:
    if argv and argv[0] == "play":
        return _play(_play_parser().parse_intermixed_args(argv[1:]))
    args = _parser().parse_args(argv)
    if args.what == "make-games":
        from opdkit.envs.textworld import make_games

        if args.n < 1:
            raise OpdkitError(f"--n: expected an integer >= 1, got {args.n}")
        if args.processes < 1:
            raise OpdkitError(f"--processes: expected an integer >= 1, got {args.processes}")
        files = make_games(args.out, args.n, difficulty=args.difficulty, split=args.split, seed=args.seed,
                           log=lambda m: print(m, file=sys.stderr), processes=args.processes)
        key = "data.train_path" if args.split == "train" else "data.eval_path (or opdkit eval --benchmark)"
        print(f"{len(files)} {args.split} games in {args.out} (use them with {key}=textworld:{args.out})")
        return 0
    return _play(_play_parser().parse_intermixed_args(argv[1:]))


def _play(args) -> int:
    from opdkit.envs.base import EnvSpec, make_env

    if args.max_steps < 1:
        raise OpdkitError(f"--max-steps: expected an integer >= 1, got {args.max_steps}")
    kind = "alfworld" if args.game.endswith(".tw-pddl") else "textworld"
    extra = {"expert": True} if kind == "textworld" and args.walkthrough else {}
    env = make_env(EnvSpec(kind, {"game_file": args.game, "max_steps": args.max_steps, **extra}))
    print(env.reset())
    commands = list(args.commands)
    if args.walkthrough:
        commands = (env.last_info.get("expert_commands") if kind == "textworld" else env.walkthrough()) or []
    source = iter(commands) if commands or args.walkthrough else (line.strip() for line in sys.stdin)
    won = False
    for command in source:
        print(f"> {command}")
        obs, _reward, done, info = env.step(command)
        print(obs)
        won = bool(info.get("won"))
        if done:
            break
    env.close()
    print(f"[{'won' if won else 'not won'}]")
    return 0 if won else 1
