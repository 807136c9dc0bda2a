"""The ``opdkit`` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys

from opdkit import __version__
from opdkit.errors import OpdkitError


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [a.b=value ...]``: the first item is the file unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _cmd_config(args: argparse.Namespace) -> int:
    from opdkit.config import config_to_yaml, load_config, save_config

    path, overrides = _split_config_args(args.items)
    cfg = load_config(path, overrides)
    if args.out:
        save_config(cfg, args.out)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
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


def _cmd_train(args: argparse.Namespace) -> int:
    from opdkit.config import load_config
    from opdkit.train import Trainer
    from opdkit.train.run_dir import CONFIG_FILE

    if args.resume:
        if args.items:
            raise OpdkitError("--resume continues a run with its own config; drop CONFIG and the overrides")
        trainer = Trainer(load_config(f"{args.resume}/{CONFIG_FILE}"), args.resume, resume=True)
    else:
        path, overrides = _split_config_args(args.items)
        cfg = load_config(path, overrides)
        trainer = Trainer(cfg, cfg.run.out_dir, overwrite=cfg.run.overwrite)
    result = trainer.run()
    if trainer.c.dist.is_main:
        print(f"run directory: {result.run_dir}")
        print(f"final model:   {result.final_dir}")
    return 0


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


def _cmd_check(args: argparse.Namespace) -> int:
    import json

    from opdkit.check import run_check

    report = run_check(args.student, args.teacher, trust_remote_code=args.trust_remote_code, device=args.device)
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
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "train",
        help="on-policy distillation from a config",
        description="Train a student by on-policy distillation. CONFIG is a YAML file (see configs/); "
        "a.b=value overrides any field. --resume RUN_DIR continues an interrupted run from its last checkpoint.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [a.b=value ...]")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
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
    p.add_argument("--teacher", required=True, help="teacher model directory")
    p.add_argument("--device", default=None, help="device for the teacher's dry run (default: CPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow modelling code shipped with the models")
    p.set_defaults(func=_cmd_check)

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
    p.add_argument("--steps", type=int, default=None, help="--toy only: optimizer steps per objective")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OpdkitError as exc:
        print(f"opdkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
