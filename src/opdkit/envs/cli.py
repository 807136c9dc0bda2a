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
                       description="Generate N TextWorld games with TextWorld's own generator into OUT "
                       "({split}-NNNN.z8 + .json). train and test games come from disjoint seeds; games already "
                       "there are kept. ~3 s per game on one core.")
    m.add_argument("out", metavar="OUT")
    m.add_argument("--n", type=int, default=20, help="games to make (default 20)")
    m.add_argument("--difficulty", default="easy", choices=("easy", "medium", "hard"),
                   help="easy: 1 room, 1 action; medium: 2 rooms, 2 actions; hard: 3 rooms, 3 actions")
    m.add_argument("--split", default="train", choices=("train", "test"))
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--processes", type=int, default=1, help="games made in parallel (default 1)")
    g = sub.add_parser("play", help="play a game: by hand, or the given commands",
                       description="Play GAME (a .z8/.ulx TextWorld game or an ALFWorld game.tw-pddl) as the "
                       "student sees it (cleaned observations).")
    g.add_argument("game", metavar="GAME")
    g.add_argument("commands", nargs="*", help="commands to play (default: read them from stdin)")
    g.add_argument("--walkthrough", action="store_true", help="play the game's own winning walkthrough")
    g.add_argument("--max-steps", type=int, default=50)
    return p


def main_envs(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.what == "make-games":
        from opdkit.envs.textworld import make_games

        if args.n < 1:
            raise OpdkitError(f"--n: expected an integer >= 1, got {args.n}")
        files = make_games(args.out, args.n, difficulty=args.difficulty, split=args.split, seed=args.seed,
                           log=lambda m: print(m, file=sys.stderr), processes=max(1, args.processes))
        print(f"{len(files)} games in {args.out} (train on them with data.train_path=textworld:{args.out})")
        return 0
    return _play(args)


def _play(args) -> int:
    from opdkit.envs.base import EnvSpec, make_env

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
