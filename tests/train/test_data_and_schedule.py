"""Prompt files, LR schedules and atomic checkpoints (no models)."""

from __future__ import annotations

import pytest
import torch

from opdkit.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from opdkit.train.data import DataError, load_prompts
from opdkit.train.schedule import lr_multiplier


def test_load_prompts_strings_and_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "hi", "answer": 3}\n\n{"prompt": [{"role": "user", "content": "yo"}]}\n')
    recs = load_prompts(p)
    assert recs[0].messages == ({"role": "user", "content": "hi"},) and recs[0].answer == "3"
    assert recs[1].messages[0]["content"] == "yo" and recs[1].answer is None


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"prompt": "a"}\n{oops}\n', "line 2: not valid JSON"),
        ('["a"]\n', "line 1: expected a JSON object"),
        ('{"question": "a"}\n', "line 1: missing the prompt field 'prompt'"),
        ('{"prompt": 3}\n', "line 1: field 'prompt' must be"),
        ("\n", "no prompts"),
    ],
)
def test_malformed_data_names_file_and_line(tmp_path, text, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=needle) as err:
        load_prompts(p)
    assert str(p) in str(err.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "none.jsonl")


def test_schedules():
    assert [lr_multiplier(s, schedule="constant", warmup_steps=2, total_steps=10) for s in range(4)] == [
        0.5, 1.0, 1.0, 1.0
    ]
    cos = [lr_multiplier(s, schedule="cosine", warmup_steps=0, total_steps=10) for s in (0, 5, 10, 20)]
    assert cos[0] == 1.0 and cos[1] == pytest.approx(0.5) and cos[2] == pytest.approx(0.0) and cos[3] == 0.0


def test_checkpoints_keep_last_and_round_trip(tmp_path):
    state = {"optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "rng": torch.get_rng_state()}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model_state={"w": torch.full((2,), float(step))}, state=state,
                        trainer_state={"prompt_counter": step * 4}, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 3]
    model, st, trainer = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(model["w"], torch.full((2,), 3.0)) and trainer == {"prompt_counter": 12, "step": 3}
    assert torch.equal(st["rng"], state["rng"])
