"""The environment worker pool: parallel steps, an environment that raises, hangs or kills its process ends its
own episode as a recorded failure, and the other episodes go on (those sharing its worker replayed)."""

from __future__ import annotations

import time

import pytest

from opdkit.envs.base import EnvError, EnvSpec
from opdkit.envs.pool import EnvPool


def _spec(goal=("a", "b"), **kw) -> EnvSpec:
    return EnvSpec("scripted", {"first": "start", "goal": list(goal), "max_steps": 10, **kw})


def test_steps_run_and_episodes_end_when_won():
    with EnvPool(processes=2, timeout_s=20) as pool:
        first = pool.reset([_spec(), _spec(), _spec(goal=("x",))])
        assert [r.observation for r in first] == ["start"] * 3 and not any(r.done for r in first)
        out = pool.step({0: "a", 1: "zzz", 2: "x"})
        assert out[0].info["progress"] == 1 and not out[0].done
        assert out[1].observation == "Nothing happens." and not out[1].done  # not a valid command: the game's reply
        assert out[2].done and out[2].info["won"]
        out = pool.step({0: "b", 1: "a"})
        assert out[0].done and out[0].info["won"] and not out[1].done
        with pytest.raises(EnvError, match="over"):
            pool.step({2: "x"})


@pytest.mark.parametrize("processes", [0, 2])
def test_an_environment_that_raises_ends_its_episode_only(processes):
    with EnvPool(processes=processes, timeout_s=20) as pool:
        pool.reset([_spec(raise_on="boom"), _spec(), _spec()])
        out = pool.step({0: "boom", 1: "a", 2: "a"})
        assert out[0].done and not out[0].info["won"] and "RuntimeError" in out[0].info["failure"]
        assert out[1].info["progress"] == 1 and out[2].info["progress"] == 1
        out = pool.step({1: "b", 2: "b"})
        assert out[1].info["won"] and out[2].info["won"]


def test_a_hung_environment_is_ended_after_the_time_limit_and_its_neighbours_replayed():
    with EnvPool(processes=2, timeout_s=2.0) as pool:
        # episodes 0 and 2 share worker 0; 1 and 3 worker 1
        pool.reset([_spec(hang_on="hang"), _spec(), _spec(), _spec()])
        pool.step({0: "look", 1: "a", 2: "a", 3: "a"})  # every live episode has progress to lose
        t = time.monotonic()
        out = pool.step({0: "hang", 1: "b", 2: "wait", 3: "wait"})
        took = time.monotonic() - t
        assert out[0].done and out[0].info["failure"].startswith("timeout")
        assert out[1].info["won"]
        assert not out[2].done and out[2].info["progress"] == 1  # replayed in a fresh worker: progress kept
        assert pool.restarts == 1
        assert took < 20
        out = pool.step({2: "b", 3: "b"})
        assert out[2].info["won"] and out[3].info["won"]


def test_a_worker_that_dies_fails_its_episode_and_the_batch_goes_on():
    with EnvPool(processes=1, timeout_s=20) as pool:
        pool.reset([_spec(exit_on="die"), _spec()])
        pool.step({0: "a", 1: "a"})
        out = pool.step({0: "die", 1: "b"})
        assert out[0].done and "died" in out[0].info["failure"]
        assert out[1].done and out[1].info["won"]  # replayed after the crash, then its step ran


def test_an_environment_that_cannot_start_is_a_failed_episode():
    with EnvPool(processes=1, timeout_s=20) as pool:
        first = pool.reset([EnvSpec("textworld", {"game_file": "/no/such/game.z8"}), _spec()])
        assert first[0].done and "no such file" in first[0].info["failure"]
        assert not first[1].done


def test_bad_pool_settings_are_clear_errors():
    with pytest.raises(EnvError, match="env.processes"):
        EnvPool(processes=-1)
    with pytest.raises(EnvError, match="env.step_timeout_s"):
        EnvPool(processes=1, timeout_s=0)
    with pytest.raises(EnvError, match="unknown"):
        from opdkit.envs.base import make_env

        make_env(EnvSpec("nethack", {}))


def test_a_single_turn_problem_is_one_graded_step():
    problem = {"problem": "What is 2 + 2?", "answer": "4"}
    with EnvPool(processes=1, timeout_s=30) as pool:
        first = pool.reset([EnvSpec("problem", problem), EnvSpec("problem", problem)])
        assert first[0].observation == "What is 2 + 2?"
        out = pool.step({0: "<think>2 and 2</think> It is \\boxed{4}.", 1: "\\boxed{5}"})
    assert out[0].done and out[0].info["won"] and out[0].reward == 1.0
    assert out[1].done and not out[1].info["won"]
