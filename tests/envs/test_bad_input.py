"""Bad input around environments is stopped where it is written, not after a run trained on failed episodes:
data lines with wrong arguments, files that are not compiled games, game folders, flags that act on nothing,
and a step where every episode failed."""

from __future__ import annotations

import json
import shutil

import pytest

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.data.jsonl import DataError
from opdkit.data.prompts import load_prompts
from opdkit.envs.base import EnvError
from opdkit.errors import OpdkitError


def _line(path, obj):
    path.write_text(json.dumps(obj) + "\n")
    return path


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"env": "textworld"}, r"line 1: environment textworld: missing a required argument: 'game_file'"),
        ({"env": "scripted", "args": {"first": "A room.", "goal": [], "max_step": 3}},
         r"line 1: .*'max_step'.*its arguments"),
        ({"env": "scripted", "args": {"first": "A room.", "goal": [], "max_steps": "x"}}, r"line 1: .*bad arguments"),
        ({"env": "problem", "args": {}}, r"line 1: environment problem: missing a required argument: 'problem'"),
        ({"env": "problem", "args": {"problem": " ", "answer": "1"}}, r"line 1: problem: expected a non-empty"),
    ],
)
def test_bad_environment_arguments_are_data_errors_naming_the_line(tmp_path, obj, match):
    with pytest.raises(DataError, match=match):
        load_prompts(_line(tmp_path / "d.jsonl", obj))


def test_a_file_that_is_not_a_compiled_game_is_refused(tmp_path, tw_games):
    meta = tmp_path / "g.json"
    shutil.copy(tw_games[0].with_suffix(".json"), meta)
    with pytest.raises(DataError, match=r"line 1: TextWorld game .*g\.json.*expected a compiled game \(\.z8, \.ulx\)"):
        load_prompts(_line(tmp_path / "d.jsonl", {"env": "textworld", "game": "g.json"}))
    with pytest.raises(DataError, match="max_steps must be an integer >= 1"):
        load_prompts(_line(tmp_path / "d.jsonl", {"env": "textworld", "game": str(tw_games[0]),
                                                   "args": {"max_steps": -2}}))
    rc = main(["envs", "play", str(meta), "look"])
    assert rc == 2


def test_make_games_refuses_a_file_and_other_settings_for_the_same_folder(tmp_path, capsys):
    from opdkit.envs.textworld import GAMES_RECORD, make_games

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(EnvError, match="is a file, not a folder"):
        make_games(afile, 1)
    assert main(["envs", "make-games", str(afile), "--n", "1"]) == 2
    assert "is a file" in capsys.readouterr().err
    # a folder whose record says its train games were made with another seed: refused before any game is made
    games = tmp_path / "games"
    games.mkdir()
    (games / GAMES_RECORD).write_text(json.dumps({"train": {"seed": 0, "rooms": 1, "objects": 2,
                                                            "quest_length": 1}}))
    with pytest.raises(EnvError, match="already holds train games made with seed 0.*asks for seed 5"):
        make_games(games, 1, seed=5)
    with pytest.raises(EnvError, match="asks for seed 0, 3 room"):
        make_games(games, 1, difficulty="hard")
    assert main(["envs", "make-games", str(games), "--processes", "-4"]) == 2
    assert "--processes: expected an integer >= 1" in capsys.readouterr().err


def test_play_takes_flags_between_commands_and_help_shows_the_data_format(tw_games, capsys):
    assert main(["envs", "play", str(tw_games[0]), "--max-steps", "2", "look"]) == 1  # not won: exit status 1
    out = capsys.readouterr().out
    assert "> look" in out and "[not won]" in out
    with pytest.raises(SystemExit):
        main(["envs", "--help"])
    assert '{"env": "textworld", "game":' in capsys.readouterr().out


def test_eval_refuses_flags_for_benchmarks_it_does_not_have(tmp_path, tw_games, tiny_model_dirs, capsys):
    games = tmp_path / "games"
    games.mkdir()
    for f in (tw_games[0], tw_games[0].with_suffix(".json")):
        shutil.copy(f, games / f.name)
    base = ["eval", "--model", str(tiny_model_dirs["qwen2"]), "--no-progress"]
    assert main([*base, "--benchmark", "demo", "--max-turns", "3", "--out", str(tmp_path / "a")]) == 2
    assert "--max-turns: given, but no benchmark is a game" in capsys.readouterr().err
    assert main([*base, "--benchmark", f"textworld:{games}", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--max-new-tokens: given, but every benchmark is a game" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_reports_environment_failures(tmp_path, tiny_model_dirs, capsys):
    data = tmp_path / "games.jsonl"
    line = {"env": "scripted", "args": {"first": "A room.", "goal": ["x"], "raise_on": "*"}}
    data.write_text((json.dumps(line) + "\n") * 2)
    rc = main(["eval", "--model", str(tiny_model_dirs["qwen2"]), "--benchmark", f"g={data}", "--max-turns", "2",
               "--max-turn-tokens", "3", "--env-processes", "0", "--out", str(tmp_path / "e"), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "2 of 2 episodes of g ended by an environment failure" in err
    assert "ended by an environment failure" in (tmp_path / "e" / "summary.md").read_text()


def _env_run(tmp_path, tiny_model_dirs, first: str, **extra):
    data = tmp_path / "games.jsonl"
    data.write_text("".join(json.dumps({"env": "scripted", "args": {"first": first, "goal": ["take key"]}}) + "\n"
                            for _ in range(2)))
    return load_config(None, {"model.path": str(tiny_model_dirs["qwen2"]),
                              "teacher.path": str(tiny_model_dirs["llama"]), "data.train_path": str(data),
                              "optim.prompts_per_step": 1, "rollout.n_samples": 2,
                              "objective.top_k": 4, "env.max_turns": 2, "env.max_turn_tokens": 3,
                              "env.processes": 0, "run.tensorboard": False, "run.save_every": 0,
                              "optim.total_steps": 1, **extra})


def test_a_step_where_every_episode_failed_stops_the_run(tmp_path, tiny_model_dirs):
    from opdkit.train import Trainer
    from opdkit.train.loop import TrainingAborted

    cfg = _env_run(tmp_path, tiny_model_dirs, "A room. " * 40, **{"env.max_episode_tokens": 60})
    with pytest.raises(TrainingAborted, match=r"step 1: every episode failed \(budget: the first prompt .*"
                                              r"env\.max_episode_tokens"):
        Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None).run()


def test_rollout_length_with_only_environments_is_refused_and_the_budget_fits_the_context(tmp_path, tiny_model_dirs):
    from opdkit.train import Trainer

    cfg = _env_run(tmp_path, tiny_model_dirs, "A key.", **{"rollout.max_new_tokens": 7})
    with pytest.raises(OpdkitError, match="rollout.max_new_tokens: set, but every training record is an environment"):
        Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None)
    logs = []
    cfg = _env_run(tmp_path, tiny_model_dirs, "A key.", **{"env.max_episode_tokens": 100_000})
    trainer = Trainer(cfg, tmp_path / "run2", progress=False, log=logs.append)
    assert trainer.c.episode_settings.max_tokens == 2048  # the tiny student's max_position_embeddings
    assert any("env.max_episode_tokens 100000 is more than the model's context" in m for m in logs)
