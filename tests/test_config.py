"""The config tree: loading, overrides, loud failures with file/line/key, and exact round-trips."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from opdkit.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
    validate_config,
)
from opdkit.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_validate_and_every_field_is_documented():
    assert load_config() == Config() == config_from_dict({}) == validate_config(Config())
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type):
            assert f.metadata["doc"].strip(), f"{section.name}.{f.name} has no doc"


def test_yaml_with_overrides(tmp_path):
    path = write(tmp_path, "rollout:\n  top_p: 0.5\n  n_samples: 2\noptim:\n  lr: 2e-6\nmodel:\n  path: /m\n")
    cfg = load_config(
        path,
        ["rollout.top_p=0.95", "objective.special_tokens=['<think>','</think>']", "model.path=null", "optim.lr=1e-5"],
    )
    assert cfg.rollout.top_p == 0.95 and cfg.rollout.n_samples == 2
    assert cfg.objective.special_tokens == ["<think>", "</think>"]
    assert cfg.model.path is None
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.teacher == Config().teacher  # untouched sections keep their defaults


def test_overrides_apply_in_order_and_leave_the_input_alone():
    base = Config()
    cfg = apply_overrides(base, ["rollout.top_k=5", "rollout.top_k=7", " eval.top_p = 1 "])
    assert cfg.rollout.top_k == 7 and cfg.eval.top_p == 1.0
    assert base == Config()
    # A mapping skips YAML parsing, for values that are Python objects already (paths with ': ' or '#').
    assert apply_overrides(base, {"model.path": "/a: b #c"}).model.path == "/a: b #c"


def test_numbers_as_yaml_1_1_reads_them(tmp_path):
    # PyYAML reads 2e-6 as a string (YAML 1.1 wants a dot); float fields accept it, and ints widen.
    path = write(tmp_path, "optim:\n  lr: 2e-6\n  weight_decay: 0\nmodel:\n  lora_r: 4\n  lora_alpha: 32\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.model.lora_alpha == 32.0 and isinstance(cfg.model.lora_alpha, float)
    assert load_config(overrides=["optim.lr=2E-6"]).optim.lr == 2e-6


def test_unknown_key_in_file_names_path_line_and_suggestion(tmp_path):
    text = "model:\n  path: null\nrollout:\n  top_p: 0.9\nobjective:\n  kind: support_kl\n  topk: 3\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path} line 7: unknown key 'objective.topk'; did you mean 'objective.top_k'?"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("objectiv:\n  top_k: 3\n", "line 1: unknown key 'objectiv'; did you mean 'objective'?"),
        ("\nlr: 1.0e-5\n", "line 2: unknown key 'lr'; did you mean 'optim.lr'?"),
        ("rollout:\n  lr: 1.0e-5\n", "line 2: unknown key 'rollout.lr'; did you mean 'optim.lr'?"),
    ],
)
def test_misplaced_keys_get_suggestions(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_unknown_key_in_override():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["objective.topk=3"])
    assert str(e.value) == "override 'objective.topk=3': unknown key 'objective.topk'; did you mean 'objective.top_k'?"


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.top_k=0", "objective.top_k: must be >= 1, got 0"),
        ("rollout.top_p=0", "rollout.top_p: must be in (0, 1], got 0.0"),
        ("rollout.top_p=1.5", "rollout.top_p: must be in (0, 1], got 1.5"),
        ("rollout.temperature=0", "rollout.temperature: must be > 0, got 0.0"),
        ("optim.lr=-1", "optim.lr: must be >= 0, got -1.0"),
        ("objective.gamma=1.2", "objective.gamma: must be in [0, 1], got 1.2"),
        ("objective.gamma=-0.1", "objective.gamma: must be in [0, 1], got -0.1"),
        ("objective.jsd_beta=2", "objective.jsd_beta: must be in [0, 1], got 2.0"),
        ("rollout.n_samples=0", "rollout.n_samples: must be >= 1, got 0"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens: must be >= 1, got 0"),
        ("model.lora_dropout=1.0", "model.lora_dropout: must be in [0, 1), got 1.0"),
        ("optim.betas=[1.0, 0.9]", "optim.betas[0]: must be in [0, 1), got 1.0"),
        ("optim.betas=[0.9]", "optim.betas: must have 2 items, got 1"),
        ("objective.reward_clip=0", "objective.reward_clip: must be > 0, got 0.0"),
        ("optim.grad_clip=-1", "optim.grad_clip: must be > 0, got -1.0"),
        ("rollout.stop_ids=[2, -1]", "rollout.stop_ids[1]: must be >= 0, got -1"),
        ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ],
)
def test_out_of_range_names_field_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value) == f"override {override!r}: {message}"


def test_optional_bounds_allow_null():
    cfg = load_config(overrides=["objective.kind=sampled_token", "objective.reward_clip=null", "optim.grad_clip=null",
                                 "objective.reward_clip=5"])
    assert cfg.optim.grad_clip is None and cfg.objective.reward_clip == 5.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.n_samples=true", "rollout.n_samples: expected int, got bool True"),
        ("rollout.n_samples=eight", "rollout.n_samples: expected int, got str 'eight'"),
        ("rollout.n_samples=8.0", "rollout.n_samples: expected int, got float 8.0"),
        ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
        ("optim.lr=true", "optim.lr: expected float, got bool True"),
        ("data.prompt_key=[a]", "data.prompt_key: expected str, got list ['a']"),
        ("model.path=3", "model.path: expected str or null, got int 3"),
        ("run.tensorboard=1", "run.tensorboard: expected bool, got int 1"),
        ("rollout.stop=stop", "rollout.stop: expected list[str], got str 'stop'"),
        ("rollout.stop_ids=[true]", "rollout.stop_ids: expected list[int], got list [True]"),
        ("objective.special_tokens=[1.5]",
         "objective.special_tokens: expected list[str or int] or null, got list [1.5]"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value) == f"override {override!r}: {message}"


def test_choice_error():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["objective.support=foo"])
    assert str(e.value).endswith(
        "objective.support: must be one of teacher_topk, student_topk, teacher_topk_plus_sampled, teacher_topp, "
        "got 'foo'"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: null\nrollout: 3\n", "line 2: 'rollout' is a section: expected a mapping of its fields, got int 3"),
        ("- 1\n- 2\n", "line 1: expected a mapping of sections"),
        ("optim:\n  lr: 1\n  lr: 2\n", "line 3: duplicate key 'optim.lr' \\(first at line 2\\)"),
        ("optim:\n  lr: [1\n", "invalid YAML"),
        ("optim:\n  total_steps: 5\n  warmup_steps: 6\n", "line 3: optim.warmup_steps \\(6\\) must not exceed"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "objective:\n  # top_k: 3\n", "y.yaml")) == Config()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.top_k"], "override 'objective.top_k': expected key=value"),
        (["=3"], "expected key=value"),
        (["objective=3"], "'objective' is a section; override one field at a time"),
        (["optim.lr=[1"], "override 'optim.lr=\\[1': cannot parse the value as YAML"),
        (["objective.top_k.x=1"], "unknown key 'objective.top_k.x'"),
    ],
)
def test_malformed_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_dict_errors_name_the_source():
    with pytest.raises(ConfigError, match="^<dict>: 'optim' is a section: expected a mapping of its fields, got str"):
        config_from_dict({"optim": "fast"})
    with pytest.raises(ConfigError, match="^recipe: optim.lr: must be >= 0"):
        config_from_dict({"optim": {"lr": -1}}, source="recipe")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.tail_bucket=true"], "objective.tail_bucket=true requires objective.renormalize=false"),
        (["optim.total_steps=10", "optim.warmup_steps=11"], "optim.warmup_steps \\(11\\) must not exceed optim"),
        (["teacher.path=/t", "teacher.url=http://h:8000"], "set teacher.path or teacher.url, not both"),
    ],
)
def test_cross_field_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
    assert load_config(overrides=["objective.tail_bucket=true", "objective.renormalize=false"]).objective.tail_bucket


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        load_config(overrides=["rollout.top_p=2"])


def test_round_trip_defaults(tmp_path):
    save_config(Config(), tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == Config()


def test_round_trip_nontrivial_and_readable(tmp_path):
    cfg = load_config(
        overrides={
            "model.path": "/models/student",
            "model.lora_r": 8,
            "model.lora_target_modules": ["q_proj", "v_proj"],
            "objective.kind": "sampled_token",
            "optim.lr": 2e-6,
            "optim.betas": [0.9, 0.95],
            "optim.grad_clip": None,
            "objective.special_tokens": ["<", "think", "<|im_end|>", "yes", "1.5", "null", ""],
            "objective.reward_clip": 1e-300,
            "rollout.stop": ["\n\n", "#", "a: b", "\x85", "\u2028"],
            "rollout.stop_ids": [0, 151645],
            "data.prompt_key": "2e-6",
            "run.out_dir": "runs/é ü",
        }
    )
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    text = path.read_text(encoding="utf-8")
    positions = [text.index(f"\n{f.name}:") for f in dataclasses.fields(Config)]
    assert positions == sorted(positions)  # sections in declaration order
    assert "betas: [0.9, 0.95]" in text
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert text == config_to_yaml(cfg)


@given(
    lr=st.floats(min_value=0, max_value=10, allow_subnormal=True),
    top_p=st.floats(min_value=0, max_value=1, exclude_min=True),
    top_k=st.integers(min_value=1, max_value=10**6),
    gamma=st.floats(min_value=0, max_value=1),
    special=st.none() | st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=8), max_size=4),
    path=st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
)
def test_round_trip_property(tmp_path_factory, lr, top_p, top_k, gamma, special, path):
    cfg = load_config(
        overrides={
            "optim.lr": lr,
            "rollout.top_p": top_p,
            "objective.top_k": top_k,
            "objective.kind": "sampled_token",
            "objective.gamma": gamma,
            "objective.special_tokens": special,
            "model.path": path,
        }
    )
    file = tmp_path_factory.mktemp("rt") / "c.yaml"
    save_config(cfg, file)
    assert load_config(file) == cfg


def test_a_setting_that_nothing_reads_is_refused():
    """Settings of another objective or mode are refused with the reason, not silently ignored."""
    for overrides, needle in [
        (["objective.gamma=1.0"], "objective.gamma = 1.0 has no effect here: it acts only with objective.kind=sampled"),
        (["objective.kind=full_reverse_kl", "objective.top_k=8"], "objective.top_k = 8 has no effect here"),
        (["objective.kind=sampled_token", "objective.divergence=jsd"], "objective.divergence = 'jsd' has no effect"),
        (["objective.jsd_beta=0.3"], "it acts only with objective.divergence=jsd"),
        (["objective.kind=sampled_token", "objective.ppo_clip_eps=0.1", "optim.mini_batches=1"], "PPO clipping"),
        (["model.lora_alpha=8"], "it acts only with model.lora_r > 0"),
        (["objective.special_tokens=[]", "objective.special_token_mode=all"], "objective.special_tokens is empty"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(overrides=overrides)
    # the same values where they act are fine
    load_config(overrides=["objective.kind=sampled_token", "objective.gamma=1.0", "optim.mini_batches=2",
                           "objective.ppo_clip_eps=0.1"])
    load_config(overrides=["objective.divergence=jsd", "objective.jsd_beta=0.3", "model.lora_r=4",
                           "model.lora_alpha=8"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert load_config(path, ["run.seed=1"]).run.seed == 1
    if path.name == "math_qwen7b.yaml":
        assert cfg.objective.special_tokens == ["<", "think", "<|im_end|>"] and cfg.optim.lr == 2e-6
        assert cfg.rollout.max_new_tokens == 16384 and cfg.model.dtype == "bfloat16"


def test_shipped_configs_exist():
    assert {"demo.yaml", "math_qwen7b.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}


def test_import_is_light():
    code = "import sys, opdkit.config; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
