"""ALFWorld adapter: data discovery and its errors, task types, and (with TextWorld's PDDL engine installed) real
episodes of a tiny ALFWorld-format game written here: a small PDDL domain and TextWorld grammar in ALFWorld's
style (object ids mangled as ALFRED writes them), played through TextWorld's ``PddlEnv``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from opdkit.envs.alfworld import (
    TASK_TYPES,
    ALFWorldEnv,
    alfworld_data_root,
    alfworld_names,
    list_alfworld_games,
    success_by_task_type,
    task_type_of,
)
from opdkit.envs.base import EnvError, EnvSpec, make_env

# --- a tiny game in ALFWorld's file format -------------------------------------------------------------------

DOMAIN = """
(define (domain tiny_household)
  (:requirements :adl :typing)
  (:types agent location receptacle object)
  (:predicates
    (atLocation ?a - agent ?l - location)
    (receptacleAtLocation ?r - receptacle ?l - location)
    (inReceptacle ?o - object ?r - receptacle)
    (holds ?a - agent ?o - object)
    (holdsAny ?a - agent)
    (checked ?a - agent))

  (:action inventory
    :parameters (?a - agent)
    :precondition ()
    :effect (and (checked ?a)))

  (:action GotoLocation
    :parameters (?a - agent ?lStart - location ?lEnd - location ?r - receptacle)
    :precondition (and (atLocation ?a ?lStart) (receptacleAtLocation ?r ?lEnd))
    :effect (and (not (atLocation ?a ?lStart)) (atLocation ?a ?lEnd)))

  (:action PickupObject
    :parameters (?a - agent ?l - location ?o - object ?r - receptacle)
    :precondition (and (atLocation ?a ?l) (receptacleAtLocation ?r ?l) (inReceptacle ?o ?r) (not (holdsAny ?a)))
    :effect (and (not (inReceptacle ?o ?r)) (holds ?a ?o) (holdsAny ?a)))

  (:action PutObject
    :parameters (?a - agent ?l - location ?o - object ?r - receptacle)
    :precondition (and (holds ?a ?o) (atLocation ?a ?l) (receptacleAtLocation ?r ?l))
    :effect (and (inReceptacle ?o ?r) (not (holds ?a ?o)) (not (holdsAny ?a))))
)
"""

_RULES = {  # TextWorld's text grammar: "#symbol#" expands a rule, [{... | facts}] lists what the facts match
    "intro": [{"rhs": "-= Welcome to TextWorld, ALFRED! =-\n\n#room#\n\n#task#"}],
    "task": [{"rhs": "Your task is to: put some apple on diningtable."}],
    "room": [{"rhs": "You are in the middle of a room. Looking quickly around you, you see "
                     "[{r.indefinite + ' ' + r.name | receptacleatlocation(r:receptacle, l:location)}]."}],
    "arrive": [{"rhs": "You arrive at {r.name}. On the {r.name}, you see "
                       "[{o.indefinite + ' ' + o.name | inreceptacle(o:object, r:receptacle)}]."}],
    "pickup": [{"rhs": "You pick up the {o.name} from the {r.name}."}],
    "put": [{"rhs": "You move the {o.name} to the {r.name}."}],
    "carrying": [{"condition": "holdsany(a:agent)",
                  "rhs": "You are carrying: [{o.indefinite + ' ' + o.name | holds(a:agent, o:object)}]."},
                 {"rhs": "You are not carrying anything."}],
    "list_empty": [{"rhs": "nothing"}],
    "list_separator": [{"rhs": ", "}],
    "list_last_separator": [{"rhs": ", and "}],
}
GRAMMAR = 'grammar :: """\n' + json.dumps(_RULES, indent=4) + '\n""";\n\n' + """
action GotoLocation {
    template :: "go to {r}";
    feedback :: "#arrive#";
}

action PickupObject {
    template :: "take {o} from {r}";
    feedback :: "#pickup#";
}

action PutObject {
    template :: "move {o} to {r}";
    feedback :: "#put#";
}

action inventory {
    template :: "inventory";
    feedback :: "#carrying#";
}
"""

APPLE = "Apple_bar__minus_01_dot_20_bar__plus_00_dot_90_bar__plus_00_dot_30"
COUNTER = "CounterTop_bar__plus_00_dot_00_bar__plus_00_dot_90_bar__plus_00_dot_00"
TABLE = "DiningTable_bar__minus_02_dot_00_bar__plus_00_dot_75_bar__plus_01_dot_50"
CABINETS = ("Cabinet_bar__minus_01_dot_00_bar__plus_00_dot_40_bar__plus_00_dot_50",  # sorts first: "cabinet 2"
            "Cabinet_bar__plus_00_dot_20_bar__plus_00_dot_40_bar__plus_00_dot_50")
RECEPTACLES = (COUNTER, TABLE) + CABINETS

PROBLEM = f"""
(define (problem tiny_trial)
  (:domain tiny_household)
  (:objects
    agent1 - agent
    {APPLE} - object
    {" ".join(f"{r} - receptacle" for r in RECEPTACLES)}
    loc_bar_0 loc_bar_1 loc_bar_2 loc_bar_3 loc_bar_4 - location)
  (:init
    (atLocation agent1 loc_bar_0)
    {" ".join(f"(receptacleAtLocation {r} loc_bar_{i + 1})" for i, r in enumerate(RECEPTACLES))}
    (inReceptacle {APPLE} {COUNTER}))
  (:goal (inReceptacle {APPLE} {TABLE}))
)
"""

WINNING = ["go to countertop 1", "take apple 1 from countertop 1", "go to diningtable 1",
           "move apple 1 to diningtable 1"]
TASK = "pick_and_place_simple-Apple-None-DiningTable-7"


def write_game(trial: Path, *, solvable: bool | None = True, game: bool = True, traj: bool = True) -> Path:
    """A trial folder as alfworld-generate leaves it: game.tw-pddl (domain, grammar with the task written in,
    problem, solvable mark, walkthrough) beside traj_data.json."""
    trial.mkdir(parents=True, exist_ok=True)
    path = trial / "game.tw-pddl"
    if game:
        data = {"pddl_domain": DOMAIN, "grammar": GRAMMAR, "pddl_problem": PROBLEM, "walkthrough": WINNING}
        if solvable is not None:
            data["solvable"] = solvable
        path.write_text(json.dumps(data))
    if traj:
        (trial / "traj_data.json").write_text(json.dumps({"task_type": trial.parent.name.split("-")[0]}))
    return path


# --- data discovery and its errors --------------------------------------------------------------------------


def test_no_data_root_names_the_variable_and_how_to_get_the_data(monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(EnvError, match="ALFWORLD_DATA is not set") as exc:
        alfworld_data_root()
    assert "alfworld-download" in str(exc.value) and "pip install alfworld" in str(exc.value)


def test_data_root_that_is_missing_or_holds_no_games(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EnvError, match=r"nowhere \(ALFWORLD_DATA\) is not a folder"):
        alfworld_data_root()
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    with pytest.raises(EnvError, match="holds no games") as exc:
        alfworld_data_root(tmp_path)
    assert str(tmp_path / "json_2.1.1") in str(exc.value) and "game.tw-pddl" in str(exc.value)


def test_data_root_from_argument_or_variable(tmp_path, monkeypatch):
    write_game(tmp_path / "json_2.1.1" / "train" / TASK / "trial_T1")
    assert alfworld_data_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    assert alfworld_data_root() == tmp_path


def test_list_games_filters_like_alfworld(tmp_path):
    split = tmp_path / "json_2.1.1" / "valid_seen"
    kept = [write_game(split / TASK / "trial_T2"), write_game(split / TASK / "trial_T1"),
            write_game(split / "pick_two_obj_and_place-Pen-None-Desk-3" / "trial_T9")]
    write_game(split / TASK / "trial_no_traj", traj=False)
    write_game(split / TASK / "trial_no_game", game=False)
    write_game(split / "pick_and_place_with_movable_recep-Pen-Mug-Desk-1" / "trial_T1")  # movable receptacle
    write_game(split / "pick_heat_then_place_in_recep-AppleSliced-None-Fridge-1" / "trial_T1")  # sliced
    write_game(split / "some_other_task-Apple-None-Desk-1" / "trial_T1")  # not one of the six task types
    write_game(split / TASK / "trial_unsolvable", solvable=False)
    write_game(split / TASK / "trial_unchecked", solvable=None)  # no "solvable" mark: ALFWorld skips it too
    games = list_alfworld_games("valid_seen", tmp_path)
    assert games == sorted(str(p) for p in kept)
    assert len(list_alfworld_games("valid_seen", tmp_path, solvable_only=False)) == 5


def test_list_games_errors(tmp_path):
    write_game(tmp_path / "json_2.1.1" / "train" / TASK / "trial_T1")
    with pytest.raises(EnvError, match="unknown ALFWorld split 'test'"):
        list_alfworld_games("test", tmp_path)
    with pytest.raises(EnvError, match="valid_unseen is not a folder"):
        list_alfworld_games("valid_unseen", tmp_path)
    (tmp_path / "json_2.1.1" / "valid_unseen" / TASK).mkdir(parents=True)
    with pytest.raises(EnvError, match="no playable games in .*valid_unseen"):
        list_alfworld_games("valid_unseen", tmp_path)
    broken = tmp_path / "json_2.1.1" / "valid_unseen" / TASK / "trial_T1"
    write_game(broken)
    (broken / "game.tw-pddl").write_text("{not json")
    with pytest.raises(EnvError, match="cannot be read as JSON"):
        list_alfworld_games("valid_unseen", tmp_path)


def test_missing_game_file_and_bad_arguments(tmp_path):
    with pytest.raises(EnvError, match="game.tw-pddl.* does not exist"):
        ALFWorldEnv(str(tmp_path / TASK / "trial_T1" / "game.tw-pddl"))
    with pytest.raises(EnvError, match="does not exist"):
        make_env(EnvSpec("alfworld", {"game_file": str(tmp_path / "nope.tw-pddl")}))
    game = write_game(tmp_path / TASK / "trial_T1")
    with pytest.raises(EnvError, match="max_steps must be a positive integer"):
        ALFWorldEnv(str(game), max_steps=0)
    other = write_game(tmp_path / "no_task_type" / "trial_T1")
    with pytest.raises(EnvError, match="no ALFWorld task type in the path"):
        ALFWorldEnv(str(other))


# --- task types and names -----------------------------------------------------------------------------------


def test_task_type_of_paths():
    root = "/data/json_2.1.1/valid_unseen"
    assert task_type_of(f"{root}/pick_heat_then_place_in_recep-Egg-None-Fridge-13/trial_T2019/game.tw-pddl") == (
        "pick_heat_then_place_in_recep")
    assert task_type_of(Path(root) / "look_at_obj_in_light-Pen-None-DeskLamp-308" / "trial_T1") == (
        "look_at_obj_in_light")
    assert task_type_of("pick_two_obj_and_place-Pen-None-Desk-3/trial_T9/game.tw-pddl") == "pick_two_obj_and_place"
    for task_type in TASK_TYPES:
        assert task_type_of(f"{root}/{task_type}-Obj-None-Recep-1/trial/game.tw-pddl") == task_type
    with pytest.raises(EnvError, match="no ALFWorld task type"):
        task_type_of(f"{root}/pick_and_place_with_movable_recep-Pen-Mug-Desk-1/trial/game.tw-pddl")


def test_success_by_task_type():
    root = "/d/json_2.1.1/valid_seen"
    results = [(f"{root}/pick_and_place_simple-A-None-B-1/t1/game.tw-pddl", True),
               (f"{root}/pick_and_place_simple-A-None-B-2/t1/game.tw-pddl", False),
               (f"{root}/pick_cool_then_place_in_recep-A-None-B-1/t1/game.tw-pddl", True),
               ("pick_two_obj_and_place", False)]
    assert success_by_task_type(results) == {"pick_and_place_simple": 0.5, "pick_cool_then_place_in_recep": 1.0,
                                             "pick_two_obj_and_place": 0.0, "all": 0.5}
    assert success_by_task_type([]) == {}


def test_names_are_numbered_like_alfworld():
    ids = ["agent1", "appletype", "cabinet_bar__plus_00_dot_20_bar__plus_00_dot_40",
           "cabinet_bar__minus_01_dot_00_bar__plus_00_dot_40", "cabinet_bar__minus_02_dot_00_bar__plus_00_dot_40",
           "sink_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_00",
           "sink_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_00_bar_sinkbasin",
           "bathtub_bar__minus_00_dot_50_bar_00_dot_00_bar_bathtubbasin"]
    assert alfworld_names(ids) == {
        "agent1": "agent1", "appletype": "appletype",
        # sorted ids count down: "_minus_01" < "_minus_02" < "_plus_00"
        "cabinet_bar__minus_01_dot_00_bar__plus_00_dot_40": "cabinet 3",
        "cabinet_bar__minus_02_dot_00_bar__plus_00_dot_40": "cabinet 2",
        "cabinet_bar__plus_00_dot_20_bar__plus_00_dot_40": "cabinet 1",
        "sink_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_00": "sink 1",
        "sink_bar__plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_00_bar_sinkbasin": "sinkbasin 1",
        "bathtub_bar__minus_00_dot_50_bar_00_dot_00_bar_bathtubbasin": "bathtubbasin 1",
    }


# --- real episodes (TextWorld's PDDL engine: the `textworld[pddl]` extra, fast-downward-textworld) ----------


@pytest.fixture
def game(tmp_path):
    pytest.importorskip("textworld")
    pytest.importorskip("fast_downward")
    return str(write_game(tmp_path / "json_2.1.1" / "valid_seen" / TASK / "trial_T1"))


@pytest.mark.slow  # needs the alfworld extra, which `make test-slow` installs (a compiled planner)
def test_winning_episode(game):
    env = make_env(EnvSpec("alfworld", {"game_file": game, "max_steps": 10}))
    assert isinstance(env, ALFWorldEnv)
    argv = list(sys.argv)
    first = env.reset()
    assert sys.argv == argv  # the PDDL translator's sys.argv rewrite is undone
    assert first == ("You are in the middle of a room. Looking quickly around you, you see "
                     + _listing(first) + ".\n\nYour task is to: put some apple on diningtable.")
    assert sorted(_listing(first).replace(", and ", ", ").split(", ")) == [
        "a cabinet 1", "a cabinet 2", "a countertop 1", "a diningtable 1"]
    assert env.last_info["won"] is False and env.last_info["task_type"] == "pick_and_place_simple"
    assert env.last_info["admissible_commands"] == ("go to cabinet 1, go to cabinet 2, go to countertop 1, "
                                                    "go to diningtable 1, inventory")
    replies = []
    for action in WINNING:
        obs, reward, done, info = env.step(action)
        replies.append(obs)
        assert done == (action == WINNING[-1]) and info["won"] == done and reward == float(done)
    assert replies == ["You arrive at countertop 1. On the countertop 1, you see a apple 1.",
                       "You pick up the apple 1 from the countertop 1.",
                       "You arrive at diningtable 1. On the diningtable 1, you see nothing.",
                       "You move the apple 1 to the diningtable 1."]
    assert "take apple 1 from diningtable 1" in info["admissible_commands"].split(", ")
    assert env.walkthrough == WINNING
    with pytest.raises(EnvError, match="after the episode ended"):
        env.step("inventory")
    env.close()
    env.close()
    with pytest.raises(EnvError, match="before reset"):
        env.step("inventory")


@pytest.mark.slow  # needs the alfworld extra, which `make test-slow` installs (a compiled planner)
def test_unknown_command_gets_the_games_reply_and_steps_run_out(game):
    env = ALFWorldEnv(game, max_steps=3, admissible_commands=False)
    env.reset()
    assert "admissible_commands" not in env.last_info
    assert env.step("dance with the apple") == ("Nothing happens.", 0.0, False,
                                                {"won": False, "task_type": "pick_and_place_simple"})
    # only the first line of a reply is played; a command not possible now changes nothing either
    assert env.step("take apple 1 from countertop 1")[0] == "Nothing happens."
    assert env.step("inventory\ngo to countertop 1") == ("You are not carrying anything.", 0.0, True,
                                                         {"won": False, "task_type": "pick_and_place_simple"})
    # a second reset starts the episode again
    env.reset()
    assert env.step(WINNING[0])[0].startswith("You arrive at countertop 1.")
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("broken, error", [
    ({"pddl_domain": None}, "AttributeError"),
    ({"pddl_problem": PROBLEM.replace(f"(inReceptacle {APPLE} {TABLE})", f"(inReceptacle {APPLE})")}, "SystemExit"),
], ids=["no domain", "wrong arity"])
def test_unplayable_game_file_is_an_env_error(game, broken, error):
    """A bad game fails its episode, not the worker process (the PDDL translator raises SystemExit)."""
    data = json.loads(Path(game).read_text())
    data.update(broken)
    Path(game).write_text(json.dumps(data))
    argv = list(sys.argv)
    with pytest.raises(EnvError, match=f"game.tw-pddl cannot be played .*: {error}: "):
        ALFWorldEnv(game).reset()
    assert sys.argv == argv


def _listing(first: str) -> str:
    return first.split("you see ", 1)[1].split(".\n", 1)[0]
