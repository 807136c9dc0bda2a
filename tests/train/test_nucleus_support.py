"""objective.support=teacher_topp in a training run: the nucleus is cut from the teacher's top-K after scoring,
logged, and where K_max binds it is the teacher's top-K itself."""

from __future__ import annotations

import json

import pytest

from opdkit.config import load_config
from opdkit.errors import ConfigError


def _run(tmp_path, tiny_model_dirs, name, **extra):
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": str(a + 2)}) + "\n" for a in range(4)))
    cfg = load_config(None, {"model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
                             "data.train_path": str(data), "optim.prompts_per_step": 2, "rollout.n_samples": 2,
                             "rollout.max_new_tokens": 6, "objective.top_k": 8, "optim.total_steps": 1,
                             "run.tensorboard": False, "run.save_every": 0, "run.precision": "fp32", **extra})
    Trainer(cfg, tmp_path / name, progress=False, log=lambda _m: None).run()
    (row,) = read_metrics(tmp_path / name)
    return row


def test_a_nucleus_run_logs_its_sizes_and_p_one_is_top_k(tmp_path, tiny_model_dirs):
    topk = _run(tmp_path, tiny_model_dirs, "topk")
    # a random-weight teacher is flat (its top-8 hold ~4% of the mass): p = 0.999 is cut by K_max = 8 everywhere
    full = _run(tmp_path, tiny_model_dirs, "p999", **{"objective.support": "teacher_topp",
                                                      "objective.support_top_p": 0.999})
    assert full["loss"] == pytest.approx(topk["loss"], rel=1e-6)  # the same rollouts, the same support
    assert full["support_size"] == 8 and full["support_size_capped_frac"] == 1.0
    # a random-weight teacher is flat (its top-8 hold ~4% of the mass): a nucleus of 2% takes ~4 ids
    half = _run(tmp_path, tiny_model_dirs, "p05", **{"objective.support": "teacher_topp",
                                                     "objective.support_top_p": 0.02, "objective.support_min_k": 2})
    # every position reached 2% within its 8 ids: none was cut by K_max (a size below 8 or not)
    assert 2 <= half["support_size"] < 8 and half["support_size_capped_frac"] == 0.0
    assert half["loss"] != pytest.approx(topk["loss"], rel=1e-3)
    assert half["teacher_support_mass"] < topk["teacher_support_mass"]  # a smaller support holds less mass
    assert "support_size" not in topk


def test_nucleus_settings_are_refused_where_they_do_nothing():
    with pytest.raises(ConfigError, match="objective.support_top_p.*acts only with objective.support=teacher_topp"):
        load_config(None, {"objective.support_top_p": 0.8})
    with pytest.raises(ConfigError, match=r"objective.support_min_k=1 with objective.renormalize=true: the KL of a "
                                          r"renormalised one-id support is 0"):
        load_config(None, {"objective.support": "teacher_topp", "objective.support_min_k": 1})
    load_config(None, {"objective.support": "teacher_topp", "objective.support_min_k": 1,
                       "objective.renormalize": False})  # unrenormalised, one id still carries a loss
    with pytest.raises(ConfigError, match="objective.topp_correction_clip"):
        load_config(None, {"objective.kind": "sampled_token", "rollout.top_p": 0.9, "objective.topp_correction":
                           "sequence", "objective.topp_correction_clip": 5})
    for min_k in (8, 9):  # at top_k every position keeps all top_k ids: support_top_p would do nothing
        with pytest.raises(ConfigError, match=rf"objective.support_min_k \({min_k}\) must be below objective.top_k "
                                              r"\(8\).*support_top_p does nothing"):
            load_config(None, {"objective.support": "teacher_topp", "objective.top_k": 8,
                               "objective.support_min_k": min_k})
    with pytest.raises(ConfigError, match="objective.support_top_p=1 keeps all objective.top_k ids.*"
                                          "support_min_k does nothing"):
        load_config(None, {"objective.support": "teacher_topp", "objective.support_top_p": 1.0})


def test_topp_correction_acts_in_a_sampled_token_run_and_is_refused_without_truncation(tmp_path, tiny_model_dirs):
    base = {"objective.kind": "sampled_token", "rollout.top_p": 0.5}
    plain = _run(tmp_path, tiny_model_dirs, "none", **base)
    token = _run(tmp_path, tiny_model_dirs, "token", **base, **{"objective.topp_correction": "token"})
    seq = _run(tmp_path, tiny_model_dirs, "seq", **base, **{"objective.topp_correction": "sequence",
                                                            "objective.topp_correction_clip": 0.5})
    # the same rollouts (same seeds), weights Z_t <= 1: the weighted losses differ from the plain one
    assert plain["response_length"] == token["response_length"] == seq["response_length"]
    assert token["loss"] != pytest.approx(plain["loss"], rel=1e-4)
    assert seq["loss"] != pytest.approx(plain["loss"], rel=1e-4)
    assert token["topp_weight"] < 1.0 and seq["topp_weight"] < token["topp_weight"] and "topp_weight" not in plain
    # the mass the truncated rollouts never sample, 1 - Z_t: logged for every truncated run, whatever the objective
    assert 0.0 < plain["rollout_tail_mass"] < 1.0 and plain["rollout_tail_mass"] == token["rollout_tail_mass"]
    with pytest.raises(ConfigError, match="objective.topp_correction.*rollout.top_p < 1 or rollout.top_k > 0"):
        load_config(None, {"objective.kind": "sampled_token", "rollout.top_p": 1.0,
                           "objective.topp_correction": "token"})
    # top-k rollouts are truncated too: the correction acts (the sampler records the truncated log-prob)
    topk = _run(tmp_path, tiny_model_dirs, "topk5", **{"objective.kind": "sampled_token", "rollout.top_p": 1.0,
                                                      "rollout.top_k": 5, "objective.topp_correction": "token"})
    assert 0.0 < topk["topp_weight"] < 1.0 and 0.0 < topk["rollout_tail_mass"] < 1.0
    # untruncated rollouts still never draw the pad token: its mass (~1/V for a random model) is the tail
    untruncated = _run(tmp_path, tiny_model_dirs, "p1", **{"objective.kind": "sampled_token", "rollout.top_p": 1.0})
    assert 0.0 < untruncated["rollout_tail_mass"] < 0.05 < plain["rollout_tail_mass"]
    with pytest.raises(ConfigError, match="topp_correction_clip.*acts only with objective.topp_correction=sequence"):
        load_config(None, {"objective.kind": "sampled_token", "rollout.top_p": 0.9,
                           "objective.topp_correction_clip": 0.5})
