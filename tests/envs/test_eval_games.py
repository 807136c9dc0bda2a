"""`opdkit eval` on text games: each sample is an episode, correct when won; next to a math benchmark."""

from __future__ import annotations

import json
import shutil

from opdkit.cli import main


def test_opdkit_eval_plays_games_and_answers_problems(tmp_path, tw_games, tiny_model_dirs, capsys):
    games = tmp_path / "games"
    games.mkdir()
    for g in tw_games:
        for f in (g, g.with_suffix(".json")):
            shutil.copy(f, games / f.name)
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_model_dirs["qwen2"]), "--benchmark", f"tw=textworld:{games}",
               "--benchmark", "demo", "--max-problems", "2", "--n", "2", "--max-turns", "2", "--max-turn-tokens", "6",
               "--max-new-tokens", "8", "--admissible-commands", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    episodes = [r for r in rows if r["benchmark"] == "tw"]
    assert len(episodes) == 4 and {(r["problem"], r["sample"]) for r in episodes} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for r in episodes:
        assert r["gold"] == "won" and r["correct"] == (r["status"] == "won")
        # the first prompt as the student saw it: the template's text, the admissible commands included
        assert "Admissible commands:" in r["prompt"] and "<|im_start|>user" in r["prompt"]
        assert r["response"].startswith("> ") and 1 <= r["response"].count("\n> ") + 1 <= 2
    summary = json.loads((out / "summary.json").read_text())
    assert {b["benchmark"] for b in summary["benchmarks"]} == {"tw", "demo"}
    manifest = json.loads((out / "eval.json").read_text())
    assert manifest["settings"]["env"]["max_turns"] == 2 and manifest["settings"]["env"]["admissible_commands"]
    # the same command again: nothing to redo, the same summary
    assert main(["eval", "--model", str(tiny_model_dirs["qwen2"]), "--benchmark", f"tw=textworld:{games}",
                 "--benchmark", "demo", "--max-problems", "2", "--n", "2", "--max-turns", "2", "--max-turn-tokens", "6",
                 "--max-new-tokens", "8", "--admissible-commands", "--out", str(out), "--no-progress"]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(rows)
