"""TextWorld through the protocol: games generated offline by TextWorld's own generator, played for real."""

from __future__ import annotations

import json
import shutil

import pytest

from opdkit.data.jsonl import DataError
from opdkit.envs.base import EnvError, EnvSpec
from opdkit.envs.pool import EnvPool
from opdkit.envs.textworld import TextWorldEnv, clean_observation, game_seed


def test_a_scripted_walkthrough_wins_a_generated_game_through_the_worker_pool(tw_games):
    game = str(tw_games[0])
    with EnvPool(processes=1, timeout_s=60) as pool:
        spec = EnvSpec("textworld", {"game_file": game, "max_steps": 10, "admissible_commands": True, "expert": True})
        (first,) = pool.reset([spec])
        assert "$$" not in first.observation and "-=" in first.observation  # banner gone, room title kept
        walkthrough = first.info["expert_commands"]
        assert walkthrough and all(c in first.info["admissible_commands"] or i > 0 for i, c in enumerate(walkthrough))
        for i, command in enumerate(walkthrough):
            (res,) = pool.step({0: command}).values()
            assert res.done == (i == len(walkthrough) - 1)
        assert res.info["won"] and res.reward == 1.0


def test_an_invalid_command_gets_the_games_reply_and_the_episode_goes_on(tw_games):
    env = TextWorldEnv(str(tw_games[0]), max_steps=3)
    env.reset()
    obs, reward, done, info = env.step("dance wildly")
    assert obs and not done and reward == 0.0 and info["won"] is False
    env.step("xyzzy")
    obs, _, done, info = env.step("look")  # the third action: max_steps reached, not won
    assert done and not info["won"]
    env.close()


def test_only_the_first_line_of_a_reply_is_played(tw_games):
    env = TextWorldEnv(str(tw_games[0]), expert=True)
    env.reset()
    command = env.last_info["expert_commands"][0]
    obs, *_ = env.step(f"{command}\nand then some chatter")
    assert "not a verb" not in obs and "understand" not in obs.lower()
    env.close()


def test_missing_games_are_clear_errors(tmp_path, tw_games):
    with pytest.raises(EnvError, match="no such file"):
        TextWorldEnv(str(tmp_path / "nope.z8"))
    lone = tmp_path / "lone.z8"
    shutil.copy(tw_games[0], lone)
    with pytest.raises(EnvError, match=r"lone\.json"):
        TextWorldEnv(str(lone))
    from opdkit.envs.data import env_source_records

    (tmp_path / "empty").mkdir()
    with pytest.raises(EnvError, match="no compiled TextWorld games"):
        env_source_records(f"textworld:{tmp_path / 'empty'}", None, {})
    with pytest.raises(EnvError, match="no such folder"):
        env_source_records(f"textworld:{tmp_path / 'missing'}", None, {})


def test_data_lines_and_sources_name_games(tmp_path, tw_games):
    from opdkit.config import EnvConfig
    from opdkit.data.prompts import load_prompts
    from opdkit.data.sources import load_sources
    from opdkit.envs.data import env_defaults

    games = tmp_path / "games"
    games.mkdir()
    for g in tw_games:
        shutil.copy(g, games / g.name)
        shutil.copy(g.with_suffix(".json"), games / g.with_suffix(".json").name)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"env": "textworld", "game": f"games/{tw_games[0].name}"}) + "\n")
    (rec,) = load_prompts(data, env_defaults=env_defaults(EnvConfig(max_turns=7)))
    assert rec.env.kind == "textworld" and rec.task == "textworld" and rec.env.args["max_steps"] == 7
    assert rec.env.args["game_file"] == str((games / tw_games[0].name).resolve())
    recs = load_sources([f"tw=textworld:{games}", str(data)], env_defaults={})
    assert [r.task for r in recs] == ["tw", "tw", "textworld"] and all(r.env for r in recs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"env": "textworld", "game": "games/none.z8"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: game file .*none\.z8"):
        load_prompts(bad)
    bad.write_text(json.dumps({"env": "zork"}) + "\n")
    with pytest.raises(DataError, match="line 1: field 'env' must name"):
        load_prompts(bad)


def test_clean_observation_and_split_seeds():
    text = "\n\n  ________  \n | $$  | $$ \n\nHello.\n\n\n-= Attic =-\nA room.\n>  -= Attic =-0/1"
    assert clean_observation(text) == "Hello.\n-= Attic =-\nA room."
    train = {game_seed(0, "train", i) for i in range(1000)}
    test = {game_seed(0, "test", i) for i in range(1000)}
    assert not train & test
    with pytest.raises(EnvError, match="split"):
        game_seed(0, "valid", 0)


def test_interpreter_commands_and_odd_characters_never_reach_the_interpreter(tw_games):
    """A reply starting with a backslash is a frotz meta-command, on which frotz loops forever; save/restart/
    quit leave the game waiting on a question. A student writes such things: they must not stall a game."""
    from opdkit.envs.textworld import META_REPLY, safe_command

    assert safe_command("\\likeGz wall") == "likeGz wall"
    assert safe_command("héllo\x01 wörld") == "hllo wrld"
    assert safe_command("restart") is None and safe_command("Quit now") is None
    assert len(safe_command("x" * 1000)) == 200
    env = TextWorldEnv(str(tw_games[0]), max_steps=10, expert=True)
    env.reset()
    obs, _, done, _ = env.step("\\undo")
    assert not done and obs
    assert env.step("save")[0] == META_REPLY
    assert env.step("restart")[0] == META_REPLY
    command = env.last_info["expert_commands"][0]
    obs, *_ = env.step(command)  # the game still answers normally
    assert "not a verb" not in obs
    env.close()


def test_a_failed_start_with_an_admissible_commands_template_is_a_failed_episode():
    from opdkit.envs.base import EnvSpec, PromptTemplate
    from opdkit.envs.episodes import EpisodeSettings, run_episodes
    from opdkit.envs.pool import EnvPool
    from opdkit.rollout.hf_sampler import HFSampler
    from opdkit.tiny import build_tiny_model, train_tokenizer
    from tests.tiny_models import corpus

    tok = train_tokenizer(corpus(100), vocab_size=300)
    sampler = HFSampler(build_tiny_model(tok), tok)
    template = PromptTemplate(first="{observation}\nAdmissible commands: {admissible_commands}")
    with EnvPool(processes=0) as pool:
        batch, (res,) = run_episodes(sampler, pool, [EnvSpec("textworld", {"game_file": "/no/game.z8"})], [0],
                                     template=template, settings=EpisodeSettings(2, 4, 512))
    assert res.turns == 0 and "no such file" in res.failure and batch.response_mask_B_T.sum() == 0
