"""The ``opdkit`` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from opdkit import __version__
from opdkit.errors import OpdkitError


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [a.b=value ...]``: the first item is the file unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _cmd_config(args: argparse.Namespace) -> int:
    from opdkit.config import config_to_yaml, explain_config, load_config, save_config

    if args.explain:
        sys.stdout.write(explain_config())
        return 0
    path, overrides = _split_config_args(args.items)
    if args.out:
        from opdkit.paths import check_output_dir

        check_output_dir(Path(args.out).parent if str(Path(args.out).parent) else ".", "--out's directory")
        if Path(args.out).is_dir():
            raise OpdkitError(f"--out '{args.out}': is a directory; give a file name")
        if path is not None and Path(args.out).resolve() == Path(path).resolve():
            raise OpdkitError(f"--out '{args.out}': is the input config; write the resolved config elsewhere (it "
                              "would replace your file and its comments)")
    cfg = load_config(path, overrides)
    if args.out:
        try:
            save_config(cfg, args.out)
        except OSError as exc:
            raise OpdkitError(f"--out '{args.out}': cannot be written ({exc.strerror or exc})") from None
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.steps is not None and not args.toy:
        raise OpdkitError("--steps goes with --toy (the full demo's length is optim.total_steps=N)")
    if args.toy and (args.out or args.compare or args.overrides or args.cache_dir):
        raise OpdkitError("--toy runs in memory and takes only --steps (no --out, --compare, --cache-dir or "
                          "overrides)")
    if args.agentic:
        if args.toy or args.compare:
            raise OpdkitError("--agentic runs the text-game demo; it does not take --toy or --compare")
        from opdkit.demo.agentic import run_agentic_demo

        path, overrides = _split_config_args(args.overrides)
        if path is not None:
            raise OpdkitError(f"demo: expected a.b=value overrides, got {path!r}")
        run_agentic_demo(args.out, cache_dir=args.cache_dir, overrides=overrides)
        return 0
    if args.toy:
        from opdkit.demo.toy import main as toy_main

        toy_main(steps=args.steps)
        return 0
    from opdkit.demo.run import run_demo

    path, overrides = _split_config_args(args.overrides)
    if path is not None:
        raise OpdkitError(f"demo: expected a.b=value overrides, got {path!r}")
    run_demo(args.out, compare=args.compare, cache_dir=args.cache_dir, overrides=overrides)
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt(*, sigint: bool = False):
    """SIGTERM (and with ``sigint`` SIGINT too) raises ``KeyboardInterrupt``; yields a callable that says
    whether such a signal came, for code that must stop even if a library swallowed the exception."""
    import signal
    import threading

    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: bool(seen)
        return

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signals = [signal.SIGTERM, *([signal.SIGINT] if sigint else [])]
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield lambda: bool(seen)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cmd_train(args: argparse.Namespace) -> int:
    from opdkit.config import load_config
    from opdkit.interrupt import Interrupted
    from opdkit.train import Trainer
    from opdkit.train.run_dir import resume_config

    if args.resume:
        if args.items and "=" not in args.items[0]:
            raise OpdkitError(f"--resume continues a run with its own config: drop {args.items[0]!r} (only "
                              "a.b=value overrides of paths and of optim.total_steps are accepted)")
        cfg, run_dir = resume_config(args.resume, args.items), args.resume
    else:
        if args.checkpoint is not None:
            raise OpdkitError("--checkpoint goes with --resume RUN_DIR")
        path, overrides = _split_config_args(args.items)
        cfg = load_config(path, overrides)
        run_dir = cfg.run.out_dir
    try:
        with _terminate_as_interrupt():  # SIGTERM while loading: stop as cleanly as on Ctrl-C
            trainer = Trainer(cfg, run_dir, resume=bool(args.resume), from_checkpoint=args.checkpoint,
                              overwrite=cfg.run.overwrite and not args.resume)
    except KeyboardInterrupt:
        print("opdkit train: interrupted during start-up; nothing was written", file=sys.stderr)
        return 130
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        last = trainer.last_checkpoint or "none yet"
        raise Interrupted(f"abandoned on a second signal; the last checkpoint ({last}) stands. Continue with: "
                          f"opdkit train --resume {trainer.run_dir}") from None
    if trainer.c.dist.is_main:
        print(f"run directory: {result.run_dir}")
        print(f"final model:   {result.final_dir}")
    return 0


_EVAL_FLAGS = {"n_samples": "--n", "temperature": "--temperature", "top_p": "--top-p", "greedy": "--greedy",
               "max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size", "grading_processes":
               "--grading-processes", "grading_timeout_s": "--grading-timeout", "fallbacks": "--fallback"}


def _cmd_eval(args: argparse.Namespace) -> int:
    import re

    from opdkit.errors import InputError
    from opdkit.eval.evaluator import EvalSettings
    from opdkit.eval.run import SAMPLES_FILE, format_table, run_eval
    from opdkit.interrupt import Interrupted

    fields: dict[str, str] = {}
    for item in args.field or []:
        key, sep, column = item.partition("=")
        if not sep or key not in ("prompt", "answer") or not column:
            raise OpdkitError(f"--field {item!r}: expected prompt=COLUMN or answer=COLUMN")
        if key in fields:
            raise OpdkitError(f"--field {key}= given twice ({fields[key]!r} and {column!r}); give it once")
        fields[key] = column
    if args.greedy and (args.temperature is not None or args.top_p is not None):
        raise OpdkitError("--greedy decodes greedily: drop --temperature and --top-p")
    if args.max_problems < 0:
        raise OpdkitError(f"--max-problems: expected an integer >= 0 (0 = all), got {args.max_problems}")
    if args.seed < 0:
        raise OpdkitError(f"--seed: expected an integer >= 0, got {args.seed}")
    if args.threads < 0:
        raise OpdkitError(f"--threads: expected an integer >= 0 (0 = the available cores), got {args.threads}")
    d = _eval_defaults()
    try:
        settings = EvalSettings(
            n_samples=args.n, temperature=args.temperature if args.temperature is not None else d.temperature,
            top_p=args.top_p if args.top_p is not None else d.top_p, greedy=args.greedy,
            max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else d.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed,
            fallbacks=tuple(args.fallback or ()), grading_processes=args.grading_processes,
            grading_timeout_s=args.grading_timeout)
    except InputError as exc:  # name the flag, not the field
        message = re.sub(r"\b(" + "|".join(_EVAL_FLAGS) + r")\b", lambda m: _EVAL_FLAGS[m.group(1)], str(exc))
        raise OpdkitError(message) from None
    env = _env_settings(args)
    out = Path(args.out).expanduser()
    try:
        with _terminate_as_interrupt(sigint=True) as stop_requested:
            summary = run_eval(args.model, args.benchmark, out, settings, fields=fields,
                               template=args.prompt_template, system=args.system, max_problems=args.max_problems,
                               ks=args.k, device=args.device, precision=args.precision,
                               chat_template=args.chat_template, trust_remote_code=args.trust_remote_code,
                               progress=not args.no_progress, threads=args.threads, stop_requested=stop_requested,
                               env=env, given=_given_flags(args))
    except KeyboardInterrupt:
        samples = out / SAMPLES_FILE
        if samples.exists() and samples.stat().st_size:
            raise Interrupted(f"interrupted; the answers graded so far are in {samples}. Run the same command to "
                              "continue") from None
        if out.exists():
            raise Interrupted(f"interrupted before the first answer was graded ({out} holds only the settings); run "
                              "the same command to start again") from None
        print("opdkit eval: interrupted during start-up; nothing was written", file=sys.stderr)
        return 130
    print(format_table(summary), end="")
    print(f"wrote {out}/summary.json, summary.md and samples.jsonl")
    return 0


_GAME_FLAGS = {"max_turns": "--max-turns", "max_turn_tokens": "--max-turn-tokens",
               "max_episode_tokens": "--max-episode-tokens", "admissible_commands": "--admissible-commands",
               "env_system": "--env-system", "env_processes": "--env-processes", "step_timeout": "--step-timeout",
               "alfworld_data": "--alfworld-data"}


def _given_flags(args) -> set[str]:
    """The flags of ``opdkit eval`` that were given, of those that act only on some kinds of benchmark."""
    given = {flag for dest, flag in _GAME_FLAGS.items() if getattr(args, dest) is not None}
    return given | ({"--max-new-tokens"} if args.max_new_tokens is not None else set())


def _env_settings(args):
    """The ``env`` settings of ``opdkit eval``'s game flags (each checked as the config field it mirrors)."""
    from opdkit.config import load_config
    from opdkit.errors import ConfigError

    overrides = {"env.max_turns": args.max_turns, "env.max_turn_tokens": args.max_turn_tokens,
                 "env.max_episode_tokens": args.max_episode_tokens, "env.admissible_commands": args.admissible_commands,
                 "env.processes": args.env_processes, "env.step_timeout_s": args.step_timeout,
                 "env.alfworld_data": args.alfworld_data, "env.system_prompt": args.env_system}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    flags = {"env.max_turns": "--max-turns", "env.max_turn_tokens": "--max-turn-tokens",
             "env.max_episode_tokens": "--max-episode-tokens", "env.processes": "--env-processes",
             "env.step_timeout_s": "--step-timeout"}
    try:
        return load_config(None, overrides).env
    except ConfigError as exc:
        import re

        message = re.sub(r"^override '[^']*': ", "", str(exc))
        for key, flag in flags.items():
            message = message.replace(key, flag)
        raise OpdkitError(message) from None


def _envs_data_help() -> str:
    from opdkit.envs.cli import DATA_HELP

    return DATA_HELP


def _eval_defaults():
    from opdkit.config import EvalConfig

    return EvalConfig()


def _cmd_plot(args: argparse.Namespace) -> int:
    from opdkit.train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    # The analyses own their flags; importing them only here keeps every other command's start-up light.
    if args.what == "variance":
        from opdkit.analysis.variance import main_variance

        return main_variance(args.rest)
    from opdkit.analysis.run_report import main_run_report

    return main_run_report(args.rest)


def _cmd_envs(args: argparse.Namespace) -> int:
    from opdkit.envs.cli import main_envs

    return main_envs(args.rest)


def _device(name: str | None, what: str):
    """A torch device from a user's string, or a clear error (``gpu0`` is not a device; cuda needs CUDA)."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OpdkitError(f"{what}: {name!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise OpdkitError(f"{what}: {name!r} is not supported (expected cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OpdkitError(f"{what}: {name!r}, but this machine has no usable CUDA GPU (or torch is a CPU build)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OpdkitError(f"{what}: {name!r}, but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 1, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 1, got {v}")
        return v

    return parse


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    from opdkit.teacher.server import ServerLimits, serve_teacher
    from opdkit.threads import configure_threads

    if not 0 <= args.port <= 65535:
        raise OpdkitError(f"--port: expected 0..65535, got {args.port}")
    configure_threads(args.threads)
    limits = ServerLimits(max_request_bytes=args.max_request_mb << 20, max_sequences=args.max_sequences,
                          max_seq_len=args.max_seq_len, max_top_k=args.max_top_k,
                          max_response_bytes=args.max_response_mb << 20, batch_sequences=args.batch_sequences)
    return serve_teacher(args.model, host=args.host, port=args.port, token_file=args.token_file, dtype=args.dtype,
                         device=_device(args.device, "--device"), chunk_size=args.chunk_size,
                         trust_remote_code=args.trust_remote_code, limits=limits, name=args.name)


def _cmd_check(args: argparse.Namespace) -> int:
    import json

    from opdkit.check import run_check

    report = run_check(args.student, args.teacher, trust_remote_code=args.trust_remote_code,
                       device=_device(args.device, "--device"), chat_template=args.chat_template,
                       token_file=args.token_file)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opdkit",
        description="On-policy distillation with the teacher-top-K support-set objective.",
    )
    parser.add_argument("--version", action="version", version=f"opdkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "config",
        help="validate a config and print it resolved",
        description="Load CONFIG (YAML; defaults if omitted), apply a.b=value overrides, validate, "
        "and print the resolved config (or write it with --out).",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [a.b=value ...]")
    p.add_argument("--out", help="write the resolved config to this YAML file")
    p.add_argument("--explain", action="store_true",
                   help="print every field with its type, default, allowed values and meaning")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "train",
        help="on-policy distillation from a config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a student by on-policy distillation. CONFIG is a YAML file (see configs/; "
        "`opdkit config --explain` documents every field); a.b=value overrides any field. --resume RUN_DIR "
        "continues an interrupted run from its last checkpoint.",
        epilog="""required settings:
  model.path        the student: a local Hugging Face causal-LM directory
  teacher.path      the teacher: a local directory sharing the student's vocabulary (check it with opdkit check),
    or teacher.url  a teacher server: opdkit serve-teacher, or a vLLM server with teacher.api=openai
  data.train_path   prompts, JSONL, one per line:
                      {"prompt": "text" | [{"role": "system|user|assistant|tool", "content": "..."}],
                       "answer": "..." (optional; used by evaluation)}
                    (field names: data.prompt_key, data.answer_key; data.eval_path has the same format)

where the run goes:
  run.out_dir (default: a new runs/run-<time>/), created only once everything has loaded. It must be new or
  empty; run.overwrite=true reuses a directory that opdkit created as a run (removing only its run files).
  It holds config.yaml, metrics.jsonl, tensorboard/, checkpoints/ and final/ (the trained student).

several processes:  torchrun --standalone --nproc_per_node N -m opdkit.cli train ...  (or accelerate launch)
exit status: 0 done; 2 bad input (the message names the file, line, key or argument);
  75 stopped by SIGINT/SIGTERM after saving a checkpoint (continue with --resume RUN_DIR).""",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [a.b=value ...]")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint; a.b=value may then change only "
                        "paths (model.path, teacher.path, data.*_path), optim.total_steps and bookkeeping")
    p.add_argument("--checkpoint", type=int, metavar="STEP",
                   help="with --resume: continue from this checkpoint's step instead of the newest")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "analyze",
        help="bias-variance experiment, or the failure modes of a run",
        description="opdkit analyze variance --out DIR [...]: bias and variance of the sampled-token gradient "
        "for each discount gamma and of the support-set KL gradient for each K, against the exact gradient of "
        "an enumerable toy. opdkit analyze run RUN_DIR: the paper's three failure modes over a run's metrics. "
        "Add --help after the mode for its flags.",
    )
    p.add_argument("what", choices=("variance", "run"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="flags of the mode (see opdkit analyze MODE --help)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser(
        "envs",
        help="make TextWorld games offline, play a game",
        description="opdkit envs make-games OUT [--n N --difficulty easy|medium|hard --split train|test]: TextWorld "
        "games for training and evaluation. opdkit envs play GAME [COMMAND ...] [--walkthrough]: play one as the "
        "student sees it. Add --help after the mode for its flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_envs_data_help(),
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="MODE and its flags (make-games, play)")
    p.set_defaults(func=_cmd_envs)

    d = _eval_defaults()
    p = sub.add_parser(
        "eval",
        help="sample answers on benchmarks and grade them (avg@n, pass@k)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model: n sampled answers per problem of each benchmark, graded by symbolic "
        "equivalence (math-verify) of the last \\boxed{} after </think>, or by a task's own verifier. Writes "
        "samples.jsonl, summary.json and summary.md under --out and prints the table. Running the same command "
        "again continues an interrupted evaluation.",
        epilog="""benchmarks (--benchmark, repeatable):
  NAME=FILE        a .jsonl, .json or .parquet file. Known columns: problem|question|Problem|prompt and
                   answer|final_answer|Answer (or the last \\boxed{} of solution) -- the public releases of
                   MATH500, AIME24, AIME25, Minerva, OlympiadBench and GSM8K ("#### N") read as they are, and
                   so does opdkit's training format ({"prompt": text or chat messages, "answer": ...}).
                   Other columns: NAME=FILE#prompt=COLUMN,answer=COLUMN (or --field for every file).
  NAME=hf:DATASET[:SPLIT]   through the datasets library (online, or its cache filled); split default test
  demo             the demo's arithmetic task (eval split; its own prompts, no template)
  rg:TASK          a reasoning-gym task (procedural, offline, graded by its own verifier: correct when it
                   scores the answer 1.0), e.g. rg:chain_sum; problem sets are fixed (seed 0)

prompts: a problem becomes one user message by --prompt-template ({problem}; default: the problem then
  "Please reason step by step, and put your final answer within \\boxed{}."); a "prompt" column is used as is.
  The model's chat template renders it (--chat-template none for a base model).
metrics: avg@n = mean correctness over the n samples of each problem (pass@1); pass@k unbiased (Chen et
  al. 2021) for k <= n; 95% Wilson intervals over problems (conservative for n > 1); the average weighs each
  benchmark once (its interval assumes independent benchmarks). Reasoning models need a large
  --max-new-tokens (thousands); a warning says when many answers were cut. One --out holds one n: evaluate
  AIME with --n 32 in its own --out.
exit status: 0 done; 2 bad input; 75 interrupted (samples so far kept: run the same command to continue).""",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face causal-LM directory (e.g. RUN/final)")
    p.add_argument("--benchmark", action="append", required=True, metavar="NAME=FILE",
                   help="a benchmark (repeatable; see below)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, empty, or an evaluation "
                   "to continue)")
    p.add_argument("--n", type=int, default=d.n_samples, metavar="N", help="samples per problem (default %(default)s)")
    p.add_argument("--k", type=int, action="append", metavar="K",
                   help="report pass@K (repeatable; default 1, 2, 4, ... up to n)")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature (default {d.temperature})")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus threshold (default {d.top_p})")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (with --n 1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"response budget in tokens of a problem's answer (default {d.max_new_tokens}; games use "
                   "--max-turn-tokens)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="answers per generate call "
                   "(default %(default)s)")
    p.add_argument("--max-problems", type=int, default=0, help="only the first N problems of each benchmark "
                   "(the size of a built-in task; default: all, 100 for rg:)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample (default 0)")
    p.add_argument("--fallback", action="append", choices=("answer_is", "answer_colon", "hash", "last_number"),
                   help="when a response has no \\boxed{}, try this (repeatable, in order; default: none)")
    p.add_argument("--field", action="append", metavar="prompt|answer=COLUMN", help="column names of a file")
    p.add_argument("--prompt-template", default=None, metavar="TEXT", help="how a problem becomes the user message")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message before every prompt")
    p.add_argument("--grading-processes", type=int, default=d.grading_processes,
                   help="worker processes grading math answers; 0 = in this process (default %(default)s)")
    p.add_argument("--grading-timeout", type=float, default=d.grading_timeout_s, metavar="SECONDS",
                   help="time limit of one grade; an answer over it counts as wrong (default %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 on a GPU that supports it, else fp32")
    p.add_argument("--chat-template", default="model", metavar="model|none|FILE",
                   help="the chat template, as model.chat_template (default: the tokenizer's own)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow modelling code shipped with the model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = the cores this process may use "
                   "(affinity, cgroup quota). A busy core slows 2-thread torch 20-70x (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from opdkit.config import EnvConfig

    e = EnvConfig()
    g = p.add_argument_group("text games (textworld:DIR, alfworld:SPLIT, JSONL of env lines: each sample is an "
                             "episode, correct when won)")
    g.add_argument("--max-turns", type=int, default=None, help=f"actions per episode (default {e.max_turns})")
    g.add_argument("--max-turn-tokens", type=int, default=None,
                   help=f"tokens per turn (default {e.max_turn_tokens})")
    g.add_argument("--max-episode-tokens", type=int, default=None,
                   help=f"tokens per episode, observations included (default {e.max_episode_tokens}, at most the "
                   "model's context)")
    g.add_argument("--admissible-commands", action="store_true", default=None,
                   help="list the valid commands in every observation")
    g.add_argument("--env-system", default=None, metavar="TEXT", help="the episodes' system message (default: "
                   "env.system_prompt's)")
    g.add_argument("--env-processes", type=int, default=None,
                   help=f"environment worker processes (default {e.processes}; 0 = in this process)")
    g.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"time limit of one environment step (default {e.step_timeout_s})")
    g.add_argument("--alfworld-data", default=None, metavar="DIR", help="ALFWorld's data (default $ALFWORLD_DATA)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="PNG curves of a run's metrics", description="Plot RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "check",
        help="pre-flight: can this teacher distil into this student?",
        description="Compare the student's and the teacher's vocabularies, special ids and chat templates, "
        "score the student's template tokens with the teacher, and recommend a special-token mask list. "
        "Exit status 1 on a hard mismatch (training would refuse to start).",
    )
    p.add_argument("--student", required=True, help="student model directory")
    p.add_argument("--teacher", required=True, help="teacher model directory, or the http://HOST:PORT of an opdkit "
                   "teacher server (its tokenizer and vocabulary are checked; the dry run needs the weights)")
    p.add_argument("--token-file", default=None, metavar="FILE", help="the teacher server's bearer token")
    p.add_argument("--device", default=None, help="device for the teacher's dry run (default: CPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--chat-template", default="model", metavar="model|none|FILE",
                   help="the student's chat template, as model.chat_template (default: the tokenizer's own)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow modelling code shipped with the models")
    p.set_defaults(func=_cmd_check)

    from opdkit.teacher.server import ServerLimits

    lim = ServerLimits()
    p = sub.add_parser(
        "serve-teacher",
        help="serve a teacher model over HTTP for training on other processes or machines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a teacher over HTTP (FastAPI on uvicorn). A run uses it with teacher.url=http://HOST:PORT "
        "(and teacher.token_file when --token-file is set); it then receives K ids and log-probs per response "
        "token, never the vocabulary-sized logits. Loopback only unless --host says otherwise.",
        epilog="""endpoints:
  GET  /health         model, vocabulary size, tokenizer digest, dtype, limits (JSON)
  GET  /v1/tokenizer   the teacher tokenizer's files (the client's pre-flight check uses them)
  POST /v1/score       a rollout batch as safetensors bytes -> the teacher signal as safetensors bytes
  GET  /openapi.json   the OpenAPI schema (and /docs)
answers: 400 malformed request, 401 missing/wrong token, 413 over a limit, 503 busy (over 1 GiB of requests
  waiting; clients retry), 500 the model failed; the server keeps serving after each and logs them.
  Concurrent requests with the same settings are scored in one model call (up to --batch-sequences).
example:
  opdkit serve-teacher --model /models/teacher --port 8000 --token-file ~/.opdkit-token
  opdkit train cfg.yaml teacher.path=null teacher.url=http://127.0.0.1:8000 teacher.token_file=~/.opdkit-token""",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the teacher: a Hugging Face causal-LM directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine "
                   "only; 0.0.0.0 for every interface: set --token-file too, or anyone who reaches the port may use "
                   "the teacher)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 = any free port, printed)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="a file holding a bearer token every request must carry")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="weights dtype (default %(default)s; use bfloat16 on a GPU: half the memory, and faster)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--chunk-size", type=_positive("--chunk-size"), default=256,
                   help="response positions per LM-head chunk: memory O(chunk x vocab) (default %(default)s)")
    p.add_argument("--name", default=None, help="the model name /health reports (default: the directory's name)")
    p.add_argument("--max-request-mb", type=_positive("--max-request-mb"), default=lim.max_request_bytes >> 20,
                   help="largest request body (default %(default)s MiB)")
    p.add_argument("--max-sequences", type=_positive("--max-sequences"), default=lim.max_sequences,
                   help="sequences per request (default %(default)s)")
    p.add_argument("--max-seq-len", type=_positive("--max-seq-len"), default=lim.max_seq_len,
                   help="prompt + response tokens per sequence (default %(default)s, at most the model's context)")
    p.add_argument("--max-top-k", type=_positive("--max-top-k"), default=lim.max_top_k,
                   help="largest K of a top-K request (default %(default)s)")
    p.add_argument("--max-response-mb", type=_positive("--max-response-mb"), default=lim.max_response_bytes >> 20,
                   help="largest answer, which bounds the full-vocabulary support (default %(default)s MiB)")
    p.add_argument("--batch-sequences", type=_positive("--batch-sequences"), default=lim.batch_sequences,
                   help="sequences of concurrent requests merged into one model call (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = the cores this process may use")
    p.add_argument("--trust-remote-code", action="store_true", help="allow modelling code shipped with the model")
    p.set_defaults(func=_cmd_serve_teacher)

    p = sub.add_parser(
        "demo",
        help="run the built-in offline demo",
        description="On-policy distillation end to end, offline: builds (once, cached) a tokenizer, a tiny "
        "teacher fine-tuned on arithmetic with worked solutions and a weaker student, then distils the "
        "teacher into the student with the teacher-top-K objective and prints accuracies before and after.",
    )
    p.add_argument("overrides", nargs="*", metavar="a.b=value", help="overrides of the demo config")
    p.add_argument("--out", default=None, help="output directory (default: a new directory under runs/)")
    p.add_argument("--compare", action="store_true",
                   help="also run sampled-token OPD, the KL without renormalisation and off-policy SFT")
    p.add_argument("--cache-dir", default=None, help="where the demo's models are cached (default ~/.cache/opdkit)")
    p.add_argument("--toy", action="store_true", help="the seconds-long pure-torch Markov-LM demo instead")
    p.add_argument("--agentic", action="store_true",
                   help="the text-game demo instead: a tiny agent distilled on-policy on TextWorld games (multi-turn "
                   "episodes), success on held-out games before and after; writes agentic_summary.json")
    p.add_argument("--steps", type=int, default=None, help="--toy only: optimizer steps per objective")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "experiment",
        help="reproduce one of the paper's claims on the demo task",
        description="Run experiment NAME on the demo task: every arm distils the demo's student with the demo's "
        "OPD config plus the arm's settings (same seed, prompts, samples and steps), and (most experiments) "
        "measures each arm's gradient variance at the starting student; writes results.json, results.csv, "
        "results.md and NAME.png under --out. The demo's models are built into the cache first if missing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_experiments_help(),
    )
    p.add_argument("name", metavar="NAME", help="the experiment (below), or 'list'")
    p.add_argument("--out", default=None, help="output directory (default runs/experiment-NAME)")
    p.add_argument("--cache-dir", default=None, help="where the demo's models are cached (default ~/.cache/opdkit)")
    p.add_argument("--steps", type=int, default=None, help="OPD steps per arm (default: the demo config's, 400)")
    p.add_argument("--seed", type=int, default=0, help="run seed of every arm (default 0)")
    p.add_argument("--probe-batches", type=int, default=8,
                   help="rollout batches per arm for the gradient variance (default 8; 0 = skip it)")
    p.add_argument("--arms", default=None, help="a comma-separated subset of the experiment's arms")
    p.add_argument("--fresh", action="store_true",
                   help="discard the results already in --out (by default a rerun with the same settings keeps "
                   "the arms finished there and runs the others: an interrupted experiment continues)")
    p.set_defaults(func=_cmd_experiment)
    return parser


def _experiments_help() -> str:
    from opdkit.experiments.arms import EXPERIMENTS

    lines = ["experiments:"]
    for e in EXPERIMENTS.values():
        lines.append(f"  {e.name}: {e.title} ({len(e.arms)} arms: {', '.join(a.name for a in e.arms)})")
        lines.append(f"    claim: {e.claim}")
    return "\n".join(lines)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from opdkit.experiments.arms import get_experiment
    from opdkit.paths import check_output_dir

    if args.name == "list":
        print(_experiments_help())
        return 0
    exp = get_experiment(args.name)
    if args.steps is not None and args.steps < 1:
        raise OpdkitError(f"--steps: expected an integer >= 1, got {args.steps}")
    if args.probe_batches < 0 or args.probe_batches == 1:
        raise OpdkitError(f"--probe-batches: expected 0 (skip) or an integer >= 2, got {args.probe_batches}")
    arms = None
    if args.arms is not None:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = sorted(set(arms) - {a.name for a in exp.arms})
        if unknown or not arms:
            raise OpdkitError(f"--arms: {', '.join(unknown) or 'empty'}: not arms of {exp.name} (its arms: "
                              f"{', '.join(a.name for a in exp.arms)})")
    out = Path(args.out if args.out is not None else f"runs/experiment-{exp.name}").expanduser()
    check_output_dir(out, "--out")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")
    from opdkit.experiments.runner import run_experiment

    summary = run_experiment(exp.name, out, cache_dir=args.cache_dir, steps=args.steps, seed=args.seed,
                             probe_batches=args.probe_batches, arms=arms, fresh=args.fresh)
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    return 0 if summary["arms"] else 1


def main(argv: list[str] | None = None) -> int:
    from opdkit.interrupt import EXIT_INTERRUPTED, Interrupted

    args = build_parser().parse_args(argv)
    # under torchrun every process runs this; say the same thing once, and tell processes' own errors apart
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"opdkit {args.command}" + (f" [process {rank}]" if world > 1 else "")
    try:
        return args.func(args)
    except Interrupted as exc:
        if rank == 0:
            print(f"opdkit {args.command}: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except OpdkitError as exc:
        print(f"{who}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
