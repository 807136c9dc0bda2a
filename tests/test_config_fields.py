"""Every setting a user can write acts or is refused.

Every field of the config tree is read by opdkit's own code (outside ``opdkit.config``) in one of three
small end-to-end runs of ``opdkit train`` (through the command line), or it is refused at start-up with a
"not supported yet" error. A new field that nothing reads fails this test.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from opdkit.cli import main
from opdkit.config import FIELD_KEYS, schema
from tests.teacher.serving import served

REFUSED: dict[str, str] = {}
# Read only with vLLM (a vLLM teacher server, the vLLM rollout engine), which lives in its own environment:
# exercised by tests/vllm/ (slow).
VLLM_ONLY = {"teacher.served_model", "teacher.tokenizer_path", "rollout.vllm_kv_cache_gb"}


@pytest.fixture
def reads(monkeypatch):
    """Record ``section.field`` whenever code outside ``opdkit.config`` (and dataclasses) reads a field."""
    seen: set[str] = set()
    for section, cls in [(f.name, f.type) for f in dataclasses.fields(schema.Config)]:
        cls = getattr(schema, cls) if isinstance(cls, str) else cls
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _section=section):
            if name in _names:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if not caller.startswith("opdkit.config") and caller not in ("dataclasses", "copy"):
                    seen.add(f"{_section}.{name}")
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    return seen


def _files(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "solution": str(a + b)}) + "\n"
                             for a in range(3) for b in range(3)))
    return train


def test_every_config_field_is_read_or_refused(tmp_path, tiny_model_dirs, reads):
    train = _files(tmp_path)
    games = tmp_path / "games.jsonl"
    games.write_text("".join(json.dumps({"env": "scripted", "task": "toy", "args": {
        "first": f"Room {i}.", "goal": ["go"], "admissible": ["go", "wait"]}}) + "\n" for i in range(2)))
    token = tmp_path / "token"
    token.write_text("a-token\n")
    common = [f"model.path={tiny_model_dirs['qwen2']}", f"teacher.path={tiny_model_dirs['llama']}",
              f"data.train_path={train}", "data.prompt_key=question", "data.answer_key=solution",
              "optim.total_steps=1", "rollout.max_new_tokens=6", "rollout.n_samples=2", "optim.prompts_per_step=2",
              "objective.top_k=4", "run.tensorboard=false", "run.device=cpu", "run.precision=fp32"]
    runs = [
        ["model.lora_r=2", "model.lora_alpha=4", "model.lora_dropout=0.1", "model.lora_target_modules=[q_proj]",
         "model.gradient_checkpointing=true", "teacher.own_chat_template=true", f"data.eval_path={train}",
         "eval.every_steps=1", "eval.max_problems=2", "eval.batch_size=2", "objective.special_tokens=['<|im_end|>']",
         "objective.drop_special_from_support=true", "rollout.stop=['!']", "rollout.stop_ids=[5]",
         "run.save_every=1", "run.keep_last=1", "run.log_every=1"],
        ["objective.kind=sampled_token", "optim.mini_batches=2", "objective.reward_clip=2.0",
         "optim.schedule=cosine", "optim.warmup_steps=1", "optim.grad_clip=null", "rollout.top_p=0.9",
         "objective.topp_correction=sequence", "objective.topp_correction_clip=0.5"],
        ["objective.kind=full_reverse_kl", "run.overwrite=true"],
        # multi-task: a math task and a text-game task, each with its own teacher, drawn by weight
        [f"data.train_path=[math={train},{games}]", "data.task_sampling=weighted", "data.task_weights=[math=1,toy=3]",
         f"teacher.per_task=[toy={tiny_model_dirs['qwen2']}]", "env.max_turns=2", "env.max_turn_tokens=4",
         "env.max_episode_tokens=512", "env.admissible_commands=true", "env.system_prompt=Play.", "env.processes=1",
         "env.step_timeout_s=30", f"env.alfworld_data={tmp_path}", "optim.total_steps=2"],
        # a nucleus support cut from a served teacher's top-K
        ["teacher.url=SERVER", "teacher.api=opdkit", f"teacher.token_file={token}", "teacher.timeout_s=60",
         "teacher.retries=2", "objective.support=teacher_topp", "objective.support_top_p=0.02",
         "objective.support_min_k=2"],
    ]
    for i, extra in enumerate(runs):
        if "teacher.url=SERVER" in extra:
            with served(tiny_model_dirs["llama"], "--token-file", str(token)) as (url, _):
                extra = [e.replace("SERVER", url) for e in extra]
                base = [o for o in common if not o.startswith("teacher.path")]
                assert main(["train", *base, *extra, f"run.out_dir={tmp_path / 'remote'}"]) == 0
            continue
        out = tmp_path / f"run{i}"
        full = "objective.kind=full_reverse_kl" in extra  # its support is the whole vocabulary: no top_k
        base = [o for o in common if not (full and o.startswith("objective.top_k"))]
        assert main(["train", *base, *extra, f"run.out_dir={out}"]) == 0
        assert (out / "final" / "model.safetensors").exists()
    # the refused settings are read too, and refused with a clear message
    for key, value in REFUSED.items():
        bad = [o for o in common if not o.startswith("teacher.path")] if key == "teacher.url" else common
        assert main(["train", *bad, f"{key}={value}", f"run.out_dir={tmp_path / 'refused'}"]) == 2
        assert not (tmp_path / "refused").exists()  # refused before anything was written
    unread = [k for k in FIELD_KEYS if k not in reads and k not in VLLM_ONLY]
    assert not unread, f"config fields read by nothing: {unread}"


def test_vllm_engine_without_vllm_is_a_clear_error(tmp_path, tiny_model_dirs, capsys):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed in this environment")
    except ImportError:
        pass
    train = _files(tmp_path)
    base = [f"model.path={tiny_model_dirs['qwen2']}", f"data.train_path={train}", "data.prompt_key=question",
            f"teacher.path={tiny_model_dirs['llama']}", f"run.out_dir={tmp_path / 'r'}"]
    assert main(["train", *base, "rollout.engine=vllm"]) == 2
    assert "rollout.engine=vllm needs vLLM: pip install 'opdkit[vllm]'" in capsys.readouterr().err
    assert main(["train", *base, "rollout.engine=vllm", "rollout.old_logprobs=sampler"]) == 2
    assert "rollout.old_logprobs=sampler with rollout.engine=vllm" in capsys.readouterr().err
    assert main(["train", *base, "rollout.vllm_kv_cache_gb=2"]) == 2
    assert "it acts only with rollout.engine=vllm" in capsys.readouterr().err


@pytest.mark.parametrize("setting, words", [
    ("teacher.token_file=/tmp/x", "teacher.token_file = '/tmp/x' has no effect here: it acts only with teacher.url"),
    ("teacher.retries=3", "teacher.retries = 3 has no effect here"),
])
def test_remote_teacher_settings_without_url_are_refused(tmp_path, tiny_model_dirs, capsys, setting, words):
    train = _files(tmp_path)
    base = [f"model.path={tiny_model_dirs['qwen2']}", f"data.train_path={train}", "data.prompt_key=question",
            f"teacher.path={tiny_model_dirs['llama']}"]
    assert main(["train", *base, setting]) == 2
    assert words in capsys.readouterr().err


def test_server_side_settings_with_url_are_refused(tmp_path, tiny_model_dirs, capsys):
    train = _files(tmp_path)
    base = [f"model.path={tiny_model_dirs['qwen2']}", f"data.train_path={train}", "data.prompt_key=question",
            "teacher.url=http://127.0.0.1:9"]
    assert main(["train", *base, "teacher.chunk_size=64"]) == 2
    assert "teacher.chunk_size = 64 has no effect here: it acts on a local teacher" in capsys.readouterr().err
    assert main(["train", *base, "teacher.retries=0", f"run.out_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "teacher.url: the teacher server at http://127.0.0.1:9/health did not answer after 1 tries" in err
    assert not (tmp_path / "r").exists()
