"""``opdkit demo --agentic``: on-policy distillation of a text-game agent, offline, on a CPU.

1. Games: TextWorld's own generator makes small games offline (train and held-out test games from disjoint
   seeds), cached with the models.
2. A tokenizer trained on the games' text; a tiny teacher fine-tuned on walkthrough episodes of the train
   games (each a chat conversation exactly as the episode runner builds it: the observation and admissible
   commands as user turns, one command per assistant turn, the loss on the commands), including
   "detour" episodes where a random admissible command is played first and TextWorld's recomputed walkthrough
   follows (the detour is not trained on), so the teacher knows how to go on from the states a student
   reaches; a weaker student, the same architecture fine-tuned far less, with label smoothing (a student
   that is confidently wrong gets almost no reverse-KL gradient: see ``opdkit.demo.settings``).
3. Success on the held-out games (won within the turn limit; sampled, τ 1.0, top-p 0.9) of the teacher
   and of the student, then OPD on the train games with ``opdkit/demo/agentic.yaml``: the student plays
   episodes, the teacher scores its top-K tokens at every student token of every turn, the student learns
   the renormalised support-set reverse KL. Then the student's success again. ``agentic_summary.json``
   (``teacher_success``, ``student_success_before``, ``student_success_after``) and the run go under
   ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from opdkit.demo.settings import ModelSpec
from opdkit.errors import OpdkitError

__all__ = ["AgenticSettings", "agentic_config", "build_agentic_entry", "prepare_agentic", "run_agentic_demo"]

SYSTEM = "You are playing a text adventure game. Read the observation and reply with exactly one command."


@dataclass(frozen=True)
class AgenticSettings:
    """Every number of the agentic demo's games and models (all enter the cache key).

    Attributes:
        train_games, test_games: games generated per split (train: SFT and OPD; test: held out).
        rooms, objects, quest_length: TextWorld's generator settings of every game.
        max_turns, max_turn_tokens: the episode limits (also the OPD run's ``env.*``).
        vocab_size: BPE vocabulary of the tokenizer trained on the games' text.
        detours: per train game, extra SFT episodes that start with a random admissible command.
        teacher, student: architecture and fine-tuning (``train_problems``, ``stop_at_accuracy``, the checks
            are not used here).
        eval_samples: episodes per test game in each success measurement.
    """

    train_games: int = 120
    test_games: int = 40
    rooms: int = 1
    objects: int = 3
    quest_length: int = 1
    max_turns: int = 4
    max_turn_tokens: int = 12
    vocab_size: int = 800
    detours: int = 2
    teacher: ModelSpec = ModelSpec(hidden_size=128, num_layers=4, intermediate_size=256, sft_steps=1500,
                                   batch_size=16, lr=3e-3, warmup=50)
    student: ModelSpec = ModelSpec(hidden_size=128, num_layers=4, intermediate_size=256, sft_steps=150,
                                   batch_size=16, lr=3e-3, warmup=20, min_lr_ratio=1.0, init_seed=1,
                                   label_smoothing=0.1)
    eval_samples: int = 2
    eval_temperature: float = 1.0
    eval_top_p: float = 0.9


def _env_cfg(settings: AgenticSettings):
    from opdkit.config import load_config

    return load_config(None, {"env.max_turns": settings.max_turns, "env.max_turn_tokens": settings.max_turn_tokens,
                              "env.admissible_commands": True, "env.system_prompt": SYSTEM}).env


def _walkthrough(game: Path, max_steps: int, rng: random.Random | None):
    """Play ``game``'s walkthrough (after one random admissible command if ``rng``): the observations and
    infos seen, the commands played, and which of them are the walkthrough's (trained on); None if it did not
    end in a win within ``max_steps``."""
    from opdkit.envs.textworld import TextWorldEnv

    env = TextWorldEnv(str(game), max_steps=max_steps, admissible_commands=True, expert=True)
    obs, infos, commands, trained = [env.reset()], [dict(env.last_info)], [], []
    won = done = False
    try:
        if rng is not None:
            choices = [c for c in infos[0]["admissible_commands"].split(", ") if c not in infos[0]["expert_commands"]]
            if not choices:
                return None
            detour = rng.choice(choices)
            o, _, done, info = env.step(detour)
            obs.append(o)
            infos.append(info)
            commands.append(detour)
            trained.append(False)
        while not done and len(commands) < max_steps:
            plan = infos[-1].get("expert_commands") or []
            if not plan:
                break
            o, _, done, info = env.step(plan[0])
            obs.append(o)
            infos.append(info)
            commands.append(plan[0])
            trained.append(True)
            won = bool(info.get("won"))
    finally:
        env.close()
    return (obs, infos, commands, trained) if won else None


def episode_example(tokenizer, template, obs, infos, commands, trained):
    """One SFT example of an episode, token for token as :func:`opdkit.envs.episodes.run_episodes` lays it out
    (first prompt, then each command + EOS, then the template's turn between): labels on the trained commands
    and their EOS only."""
    from opdkit.data.chat import render_chat
    from opdkit.demo.sft import IGNORE, SFTExample
    from opdkit.envs.episodes import first_messages, turn_suffix

    ids = render_chat(tokenizer, first_messages(template, obs[0], infos[0]))
    labels = [IGNORE] * len(ids)
    eos = tokenizer.eos_token_id
    eos_text = tokenizer.decode([eos])
    for k, (command, train) in enumerate(zip(commands, trained, strict=True)):
        reply = [int(t) for t in tokenizer(command, add_special_tokens=False)["input_ids"]] + [eos]
        ids += reply
        labels += reply if train else [IGNORE] * len(reply)
        if k + 1 < len(commands):
            between = turn_suffix(tokenizer, template.render(obs[k + 1], infos[k + 1], first=False),
                                  system=template.system, after_eos=eos_text)
            ids += between
            labels += [IGNORE] * len(between)
    return SFTExample(tuple(ids), tuple(labels))


def build_agentic_entry(out: Path, settings: AgenticSettings, seed: int, say: Callable[[str], None]) -> dict:
    """Games, tokenizer, teacher and student into ``out`` (``games/``, ``tokenizer/``, ``teacher/``,
    ``student/``); returns what was measured (the manifest's ``info``)."""
    from transformers.utils import logging as hf_logging

    from opdkit.demo.sft import sft_train
    from opdkit.envs.base import template_from_config
    from opdkit.envs.textworld import Difficulty, make_games
    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer

    hf_logging.disable_progress_bar()
    t_build = time.perf_counter()
    d = Difficulty(settings.rooms, settings.objects, settings.quest_length)
    t0 = time.perf_counter()
    say(f"agentic demo: generating {settings.train_games} + {settings.test_games} TextWorld games")
    train = make_games(out / "games" / "train", settings.train_games, difficulty=d, split="train", seed=seed,
                       processes=2)
    make_games(out / "games" / "test", settings.test_games, difficulty=d, split="test", seed=seed, processes=2)
    info: dict[str, Any] = {"games_seconds": round(time.perf_counter() - t0, 2)}
    rng = random.Random(seed)
    plays = []
    for game in train:
        for k in range(1 + settings.detours):
            play = _walkthrough(game, settings.max_turns, rng if k else None)
            if play is not None:
                plays.append(play)
    template = template_from_config(_env_cfg(settings))
    texts = [SYSTEM] + [template.render(o, i, first=True) + "\n" + "\n".join(c)
                        for obs, infos, c, _ in plays for o, i in zip(obs, infos, strict=True)]
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    examples = [episode_example(tokenizer, template, *play) for play in plays]
    info.update(vocab_size=len(tokenizer), sft_episodes=len(examples),
                sft_tokens_mean=sum(len(e.input_ids) for e in examples) / max(len(examples), 1))
    say(f"agentic demo: {len(examples)} walkthrough episodes ({info['sft_tokens_mean']:.0f} tokens each), "
        f"tokenizer of {len(tokenizer)} tokens")
    for name in ("teacher", "student"):
        spec: ModelSpec = getattr(settings, name)
        model = build_tiny_model(tokenizer, arch=spec.arch, hidden_size=spec.hidden_size,  # type: ignore[arg-type]
                                 num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                                 intermediate_size=spec.intermediate_size, seed=seed + spec.init_seed)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"agentic demo: fine-tuning the {name} ({n_params / 1e6:.2f}M parameters, {spec.sft_steps} steps)")
        t0 = time.perf_counter()
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + spec.init_seed)
            sft_train(model, examples, pad_id=tokenizer.pad_token_id, steps=spec.sft_steps, batch_size=spec.batch_size,
                      lr=spec.lr, warmup=spec.warmup, min_lr_ratio=spec.min_lr_ratio, weight_decay=spec.weight_decay,
                      seed=seed + spec.init_seed, label_smoothing=spec.label_smoothing, log=say,
                      log_every=max(1, spec.sft_steps // 5), name=f"agentic {name}")
        info[f"{name}_params"] = n_params
        info[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
        save_model_dir(model, tokenizer, out / name)
    info["build_seconds"] = round(time.perf_counter() - t_build, 2)
    return info


def prepare_agentic(cache_dir=None, *, settings: AgenticSettings | None = None, seed: int = 0, force: bool = False,
                    log=print):
    """The agentic demo's cache entry (``(root, info, built)``): built once, verified by its manifest on every
    load (:mod:`opdkit.demo.cache`)."""
    from opdkit.demo.cache import prepare_entry

    settings = settings if settings is not None else AgenticSettings()
    root, manifest, built = prepare_entry("agentic", settings, seed, build_agentic_entry, cache_dir=cache_dir,
                                          force=force, log=log)
    return root, manifest["info"], built


def agentic_config(overrides: dict[str, Any] | None = None):
    """The agentic demo's OPD config (``opdkit/demo/agentic.yaml``) with ``overrides`` applied."""
    import yaml

    from opdkit.config import config_from_dict, load_config
    from opdkit.demo.run import _flatten

    text = resources.files("opdkit.demo").joinpath("agentic.yaml").read_text()
    cfg = config_from_dict(yaml.safe_load(text) or {}, source="opdkit/demo/agentic.yaml")
    return load_config(None, {**_flatten(cfg), **(overrides or {})})


def _success(model_dir: Path, games: Path, settings: AgenticSettings, seed: int) -> float:
    from opdkit.demo.models import load_demo_model, load_demo_tokenizer
    from opdkit.envs.base import template_from_config
    from opdkit.envs.episodes import EpisodeSettings
    from opdkit.envs.evaluate import EpisodeEvaluator
    from opdkit.eval.benchmarks import load_benchmark
    from opdkit.eval.evaluator import EvalSettings

    env = _env_cfg(settings)
    from opdkit.envs.data import env_defaults

    bench = load_benchmark(f"test=textworld:{games}", env_defaults=env_defaults(env))
    ev = EpisodeEvaluator([bench], EvalSettings(n_samples=settings.eval_samples, temperature=settings.eval_temperature,
                                                top_p=settings.eval_top_p, seed=seed, batch_size=64),
                          template=template_from_config(env), episode=EpisodeSettings.from_config(env))
    return ev.evaluate(load_demo_model(model_dir), load_demo_tokenizer(model_dir))["eval_test_success"]


_MARK = "opdkit agentic demo\n"


def run_agentic_demo(out_dir=None, *, cache_dir=None, overrides=None, settings: AgenticSettings | None = None,
                     log=print) -> dict[str, Any]:
    """Run the agentic demo; returns the summary written to ``OUT/agentic_summary.json``."""
    from opdkit.config import apply_overrides
    from opdkit.demo.run import _table
    from opdkit.paths import check_output_dir
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics
    from opdkit.train.run_dir import MARKER_FILE, check_run_dir, new_run_dir

    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else new_run_dir("runs", "agentic")
    check_run_dir(out, resume=False, overwrite=True, what="--out")
    if (out / MARKER_FILE).is_file() and (out / MARKER_FILE).read_text() != _MARK:
        raise OpdkitError(f"--out '{out}': holds something other than an earlier agentic demo's output; choose "
                          "another")
    if cache_dir is not None:
        check_output_dir(cache_dir, "--cache-dir")
    if overrides:
        apply_overrides(agentic_config(), overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(_MARK)
    settings = settings if settings is not None else AgenticSettings()
    root, info, built = prepare_agentic(cache_dir, settings=settings, log=log)
    games = root / "games"
    cfg = agentic_config({"model.path": str(root / "student"), "teacher.path": str(root / "teacher"),
                          "data.train_path": f"textworld:{games / 'train'}",
                          "env.max_turns": settings.max_turns, "env.max_turn_tokens": settings.max_turn_tokens})
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    t0 = time.perf_counter()
    teacher = _success(root / "teacher", games / "test", settings, cfg.run.seed)
    before = _success(root / "student", games / "test", settings, cfg.run.seed)
    eval_seconds = time.perf_counter() - t0
    log(f"agentic demo: held-out success: teacher {teacher:.1%}, student before OPD {before:.1%}")
    t0 = time.perf_counter()
    run_dir = out / "opd"
    Trainer(cfg, run_dir, overwrite=True, progress=True).run()
    opd_seconds = time.perf_counter() - t0
    after = _success(run_dir / "final", games / "test", settings, cfg.run.seed)
    rows = read_metrics(run_dir)
    train_success = [r.get("episode_success") for r in rows]
    wall = time.perf_counter() - start
    summary = {
        "teacher_success": teacher, "student_success_before": before, "student_success_after": after,
        "test_games": settings.test_games, "episodes_per_game": settings.eval_samples,
        "train_games": settings.train_games, "opd_steps": cfg.optim.total_steps,
        "train_episode_success_first_last": [train_success[0], train_success[-1]] if train_success else None,
        "opd_seconds": round(opd_seconds, 1), "eval_seconds": round(eval_seconds, 1), "wall_seconds": round(wall, 1),
        "models_built": built, "model_build_seconds": info.get("build_seconds") if built else 0.0,
        "settings": dataclasses.asdict(settings), "run_dir": str(run_dir),
    }
    (out / "agentic_summary.json").write_text(json.dumps(summary, indent=2))
    print(_table([("", "held-out success", "seconds"), ("teacher", f"{teacher:.1%}", ""),
                  ("student before OPD", f"{before:.1%}", ""),
                  ("student after OPD (teacher top-K KL, renormalised)", f"{after:.1%}", f"{opd_seconds:.0f}"),
                  ("whole demo (wall)", "", f"{wall:.0f}")]))
    log(f"agentic demo: wrote {out / 'agentic_summary.json'}")
    return summary
