"""The ``opdkit analyze variance`` command line: its flags, and running the experiment from them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from opdkit.analysis import variance_experiment
from opdkit.analysis.lm_variance import (
    DEMO_GAMMAS,
    DEMO_KS,
    DEMO_TS,
    LM_N_ESTIMATES,
    LM_SAMPLES_PER_ESTIMATE,
)
from opdkit.analysis.toy import DEFAULT_PROBLEM, PROBLEM_PRESETS
from opdkit.analysis.variance_experiment import (
    DEFAULT_GAMMAS,
    DEFAULT_KS,
    DEFAULT_N_ESTIMATES,
    DEFAULT_SAMPLES_PER_ESTIMATE,
    DEFAULT_SEED,
    run_variance_experiment,
)
from opdkit.analysis.variance_report import MIN_RELIABLE_GROUPS, variance_ratios
from opdkit.errors import InputError

LM_PROBLEMS = ("demo", "lm")

__all__ = ["add_variance_arguments", "main_variance", "variance_from_args"]


def _list_of(cast, what: str):
    """An argparse type: comma- or space-separated values of ``cast``; argparse names the flag in its error."""

    def parse(s: str) -> list:
        try:
            values = [cast(x) for x in s.replace(",", " ").split()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        return values

    return parse


_floats = _list_of(float, "numbers")
_ints = _list_of(int, "integers")


def add_variance_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``opdkit analyze variance``."""
    p.add_argument("--out", required=True, help="output directory (variance.csv, variance.md, variance.png)")
    p.add_argument(
        "--problem",
        choices=sorted([*PROBLEM_PRESETS, *LM_PROBLEMS]),
        default=DEFAULT_PROBLEM,
        help=(
            "toy problem (default: 'bigram': a bigram student, V=8, T = 2..256, Monte Carlo with exact ∇J; "
            "'tabular': one row per prefix, V=4, T = 2..8, everything enumerated; 'imbalanced': a tabular, "
            "far student under a sharper teacher, V=2, T up to 16; 'demo': the demo's tiny student and "
            "teacher (built into the demo cache if missing, minutes), T = 4..256, the gradient w.r.t. the "
            "student's output layer; 'lm': the same with --student and --teacher)"
        ),
    )
    p.add_argument("--T", dest="Ts", type=_ints, default=None, help="horizons, e.g. '2,4,6' (default: the preset's)")
    p.add_argument("--gammas", type=_floats, default=None,
                   help=f"discounts, comma-separated (default {_csv(DEFAULT_GAMMAS)}; demo/lm {_csv(DEMO_GAMMAS)})")
    p.add_argument("--K", dest="Ks", type=_ints, default=None,
                   help=f"support sizes, V always added (default {_csv(DEFAULT_KS)}; demo/lm {_csv(DEMO_KS)})")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size V (default: the preset's)")
    p.add_argument("--n-estimates", type=int, default=None,
                   help=f"independent groups (default {DEFAULT_N_ESTIMATES}; demo/lm {LM_N_ESTIMATES})")
    p.add_argument(
        "--samples-per-estimate",
        type=int,
        default=None,
        help=f"trajectories per group (default: the problem's; bigram 100, tabular {DEFAULT_SAMPLES_PER_ESTIMATE}, "
        f"demo/lm {LM_SAMPLES_PER_ESTIMATE})",
    )
    p.add_argument("--rollout-top-p", type=float, default=1.0,
                   help="toy problems: draw rollouts from the student truncated to each row's nucleus of this "
                   "mass, and add the sampled-token estimators with token and sequence importance corrections "
                   "(default 1.0: untruncated, as in the paper's analysis)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--no-plot", action="store_true", help="skip variance.png")
    g = p.add_argument_group("language models (--problem demo or lm)")
    g.add_argument("--student", default=None, metavar="DIR", help="the student's model directory (--problem lm)")
    g.add_argument("--teacher", default=None, metavar="DIR", help="the teacher's, same tokenizer (--problem lm)")
    g.add_argument("--prompts", default=None, metavar="JSONL",
                   help="prompts ({\"prompt\": ...} lines; default: 16 of the demo task's training prompts)")
    g.add_argument("--reference-factor", type=int, default=None,
                   help="the γ=1 reference gradient uses this many times the trajectories (default 4)")
    g.add_argument("--cache-dir", default=None, metavar="DIR", help="the demo's cache (--problem demo)")


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


# Parameter names in the library's messages, and the flags they come from.
_FLAG_OF = {"Ts": "--T", "gammas": "--gammas", "vocab": "--vocab", "n_estimates": "--n-estimates",
            "samples_per_estimate": "--samples-per-estimate", "top_p": "--rollout-top-p", "Ks": "--K"}
OUT_MARKER = ".opdkit-variance"  # an earlier run's folder: written into again


def _check_out(out: str) -> None:
    """``--out``: new, empty, or an earlier ``analyze variance`` folder (never a folder of other files)."""
    from opdkit.paths import check_output_dir

    if not out.strip():
        raise InputError("--out: expected a folder, got an empty string")
    path = check_output_dir(out, "--out")
    if path.is_dir() and any(path.iterdir()) and not (path / OUT_MARKER).is_file():
        raise InputError(f"--out '{out}': a folder that holds other files; give a new or empty folder (or an "
                         "earlier analyze variance folder)")


def _check_sizes(args: argparse.Namespace) -> None:
    if args.Ts is not None and len(set(args.Ts)) != len(args.Ts):
        raise InputError(f"--T: a horizon given twice ({','.join(map(str, args.Ts))})")
    if args.Ks is not None and any(k < 1 for k in args.Ks):
        raise InputError(f"--K: expected support sizes >= 1, got {','.join(map(str, args.Ks))}")
    if args.gammas is not None and len(set(args.gammas)) != len(args.gammas):
        raise InputError(f"--gammas: a discount given twice ({','.join(f'{g:g}' for g in args.gammas)})")
    if args.Ks is not None and args.problem in PROBLEM_PRESETS:
        vocab = args.vocab if args.vocab is not None else PROBLEM_PRESETS[args.problem].vocab
        too_big = [k for k in args.Ks if k > vocab]
        if too_big:
            raise InputError(f"--K: support sizes above the vocabulary V={vocab}: {','.join(map(str, too_big))} "
                             "(V itself is always measured)")


def variance_from_args(args: argparse.Namespace) -> int:
    import re

    from opdkit.paths import check_output_dir

    _check_out(args.out)  # before minutes of computation, not after
    _check_sizes(args)
    lm_flags = [f for f, v in (("--student", args.student), ("--teacher", args.teacher), ("--prompts", args.prompts),
                               ("--cache-dir", args.cache_dir), ("--reference-factor", args.reference_factor))
                if v is not None]
    try:
        if args.problem in LM_PROBLEMS:
            if args.cache_dir is not None:
                check_output_dir(args.cache_dir, "--cache-dir")
            results = run_lm_experiment(args)
        else:
            if lm_flags:
                raise InputError(f"{', '.join(lm_flags)}: only with --problem demo or lm")
            results = _toy(args)
    except InputError as exc:  # name the flag, not the parameter
        message = re.sub(r"^(" + "|".join(_FLAG_OF) + r")\b", lambda m: _FLAG_OF[m.group(1)], str(exc))
        raise InputError(message) from None
    (Path(args.out) / OUT_MARKER).write_text("created by opdkit analyze variance\n", encoding="utf-8")
    rollouts = f", rollouts top-p {args.rollout_top_p:g}" if args.rollout_top_p < 1.0 else ""
    for T, v in variance_ratios(results).items():
        if math.isnan(v["mc"]):  # γ = 0's variance is 0: e.g. a nucleus so small the rollouts are deterministic
            print(f"T={T}: variance(gamma=1)/variance(gamma=0) undefined: variance(gamma=0) is 0{rollouts}")
            continue
        exact = "" if math.isnan(v["exact"]) else f", exact {v['exact']:.3g}"
        print(
            f"T={T}: variance(gamma=1)/variance(gamma=0) = {v['mc']:.3g} "
            f"(95% CI {v['ci_low']:.3g}-{v['ci_high']:.3g}{exact}{rollouts})"
        )
    n_groups = len(results[0].get("group_variances") or []) if results else 0
    if 0 < n_groups < MIN_RELIABLE_GROUPS:
        print(f"note: {n_groups} groups (--n-estimates): bootstrap intervals over fewer than "
              f"{MIN_RELIABLE_GROUPS} groups are rough")
    print(f"wrote {Path(args.out) / 'variance.csv'}, variance.md" + ("" if args.no_plot else ", variance.png"))
    return 0


def _toy(args: argparse.Namespace) -> list[dict]:
    return run_variance_experiment(
        args.out,
        Ts=args.Ts,
        gammas=args.gammas if args.gammas is not None else DEFAULT_GAMMAS,
        Ks=args.Ks if args.Ks is not None else DEFAULT_KS,
        vocab=args.vocab,
        n_estimates=args.n_estimates if args.n_estimates is not None else DEFAULT_N_ESTIMATES,
        samples_per_estimate=args.samples_per_estimate,
        seed=args.seed,
        plot=not args.no_plot,
        verbose=True,
        problem=args.problem,
        top_p=args.rollout_top_p,
    )


def run_lm_experiment(args: argparse.Namespace) -> list[dict]:
    """``--problem demo|lm``: load the pair and the prompts, run ``run_lm_variance``, write the files."""
    from opdkit.analysis.estimators import default_specs
    from opdkit.analysis.lm_variance import LMProblem, run_lm_variance
    from opdkit.analysis.variance_report import format_markdown, write_csv
    from opdkit.data.chat import render_chat
    from opdkit.hf import load_causal_lm, load_tokenizer

    if args.vocab is not None:
        raise InputError("--vocab: the models' vocabulary is what it is; drop it with --problem demo or lm")
    if args.rollout_top_p != 1.0:
        raise InputError("--rollout-top-p: only on the toy problems (bigram, tabular, imbalanced)")
    if args.problem == "demo":
        if args.student or args.teacher:
            raise InputError("--student/--teacher: --problem demo uses the demo's models; use --problem lm for yours")
        from opdkit.demo.cache import prepare_demo_models

        models = prepare_demo_models(args.cache_dir, log=print)
        student_dir, teacher_dir = models.student_dir, models.teacher_dir
    else:
        if args.cache_dir is not None:
            raise InputError("--cache-dir: only with --problem demo")
        if not args.student or not args.teacher:
            raise InputError("--problem lm: give --student DIR and --teacher DIR")
        student_dir, teacher_dir = args.student, args.teacher
    from opdkit.errors import OpdkitError

    try:
        tokenizer = load_tokenizer(student_dir, require_chat_template=True)
        student = load_causal_lm(student_dir, dtype="float32")
    except OpdkitError as exc:
        raise InputError(f"--student: {exc}") from None
    try:
        teacher = load_causal_lm(teacher_dir, dtype="float32")
    except OpdkitError as exc:
        raise InputError(f"--teacher: {exc}") from None
    if student.get_output_embeddings().weight.shape[0] != teacher.get_output_embeddings().weight.shape[0]:
        raise InputError("--student and --teacher: their output vocabularies differ (a shared tokenizer is needed)")
    problem = LMProblem(student, teacher, [render_chat(tokenizer, m) for m in _prompt_messages(args.prompts)])
    specs = default_specs(problem.V, args.gammas if args.gammas is not None else DEMO_GAMMAS,
                          args.Ks if args.Ks is not None else DEMO_KS)
    n_est = args.n_estimates if args.n_estimates is not None else LM_N_ESTIMATES
    per = args.samples_per_estimate if args.samples_per_estimate is not None else LM_SAMPLES_PER_ESTIMATE
    Ts = args.Ts if args.Ts is not None else list(DEMO_TS)
    factor = args.reference_factor if args.reference_factor is not None else 4
    results = run_lm_variance(problem, specs, Ts=Ts, n_estimates=n_est, samples_per_estimate=per,
                              reference_factor=factor, seed=args.seed, verbose=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "variance.csv")
    settings = dict(vocab=problem.V, Ts=Ts, n_estimates=n_est, samples_per_estimate=per, seed=args.seed,
                    problem=args.problem,
                    description=f"student {student_dir}, teacher {teacher_dir}, {len(problem.prompt_ids)} prompts; "
                    "T tokens sampled at τ = 1 (EOS an ordinary token); the gradient w.r.t. the student's output "
                    f"layer [{problem.V}, {problem.W_V_d.shape[1]}]; bias against a γ = 1 reference from "
                    f"{factor}x the trajectories (its noise is in `floor`)", lm=True)
    (out / "variance.md").write_text(format_markdown(results, settings), encoding="utf-8")
    if not args.no_plot:
        from opdkit.analysis.plots import plot_variance

        plot_variance(results, out / "variance.png")
    else:  # an earlier run's figure would no longer match the table
        (out / "variance.png").unlink(missing_ok=True)
    return results


def _prompt_messages(path: str | None) -> list[list[dict]]:
    if path is None:
        from opdkit.demo.task import chat_messages, make_problems

        return [chat_messages(p) for p in make_problems(16, seed=0, split="train")]
    from opdkit.data.prompts import load_prompts

    records = [r for r in load_prompts(path) if r.env is None]
    if not records:
        raise InputError(f"--prompts '{path}': no prompt in it")
    return [list(r.messages) for r in records]


def main_variance(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdkit analyze variance", description=variance_experiment.__doc__.splitlines()[0])
    add_variance_arguments(p)
    return variance_from_args(p.parse_args(argv))
