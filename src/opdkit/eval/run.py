"""``opdkit eval``: sample answers from a model on benchmarks, grade them, and write what was measured.

The output directory holds:

- ``samples.jsonl``: one line per sample (benchmark, problem index, sample index, prompt as rendered,
  response, extracted answer, gold, correct, grader status, response tokens, truncated), appended batch by
  batch and flushed to disk, so an interrupted evaluation loses at most the batch in flight;
- ``eval.json``: what the samples depend on (model digest, chat template, sampling and grading settings, each
  benchmark's problems digest); ``.opdkit-eval`` marks the directory as an evaluation;
- ``summary.json`` and ``summary.md``: per benchmark the number of problems, n, avg@n with its 95% interval,
  pass@k for each k, mean response length, truncation and no-answer rates; and the mean over benchmarks.

Running the same command again continues from ``samples.jsonl`` (the samples already there are kept, not
redrawn: every sample has its own seed, so the result is the same as an uninterrupted run). A larger ``--n``
or another benchmark may be added on a continuation; anything else that would change the samples already
drawn is refused, naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from opdkit.errors import OpdkitError
from opdkit.paths import write_text_atomic

__all__ = ["EVAL_MARKER", "SAMPLES_FILE", "format_table", "read_samples", "run_eval", "summarise_samples"]

EVAL_MARKER = ".opdkit-eval"
SAMPLES_FILE = "samples.jsonl"
MANIFEST_FILE = "eval.json"


def _digest_problems(bench) -> str:
    h = hashlib.sha256()
    for p in bench.problems:
        h.update(json.dumps([list(p.messages), p.answer], sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _jsonl_line(row: dict) -> str:
    """One JSON Lines record, UTF-8 text kept readable, with the three characters that some readers take for
    line breaks (U+0085, U+2028, U+2029; a model's response can contain them) escaped."""
    text = json.dumps(row, ensure_ascii=False)
    return text.replace("\u0085", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def _ends_with_newline(path: Path) -> bool:
    """An empty file, or one whose last byte is a newline (a kill can leave half a line)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_samples(out_dir: str | Path) -> list[dict]:
    """The samples of an evaluation directory; a last line cut short by a kill is dropped from the file."""
    from opdkit.data.jsonl import read_jsonl

    path = Path(out_dir) / SAMPLES_FILE
    if not path.exists():
        return []
    rows = [row for _, row in read_jsonl(path, what="samples file", skip_bad_lines=True)]
    keys = ("benchmark", "problem", "sample", "correct")
    good = [r for r in rows if all(k in r for k in keys)]
    if len(good) != len(rows) or not _ends_with_newline(path):
        write_text_atomic(path, "".join(_jsonl_line(r) for r in good))
    return good


def _check_out_dir(out: Path) -> bool:
    """True when ``out`` holds an evaluation to continue; refuse a folder with files that opdkit did not write."""
    from opdkit.paths import check_output_dir

    check_output_dir(out, "--out")
    if not out.exists() or not any(out.iterdir()):
        return False
    if (out / EVAL_MARKER).exists():
        return True
    raise OpdkitError(f"--out '{out}': holds files and is not an opdkit evaluation (no {EVAL_MARKER}); give a new "
                      "or empty directory")


def _lock(out: Path):
    """An exclusive lock on the evaluation directory for this process's lifetime (released on exit or kill):
    a second ``opdkit eval`` on the same ``--out`` is refused instead of interleaving samples."""
    import fcntl

    f = open(out / ".opdkit-eval.lock", "a")  # noqa: SIM115 - held open while the evaluation runs
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OpdkitError(f"--out '{out}': another opdkit eval is writing to it (wait for it to finish, or give "
                          "another --out)") from None
    return f


def _check_model_dir(path: Path) -> None:
    from opdkit.train.run_dir import MARKER_FILE

    if (path / MARKER_FILE).exists():
        hint = f"evaluate its trained student, --model {path / 'final'}" if (path / "final").is_dir() else (
            "it has no final/ yet (the run has not finished); checkpoints hold training state, not a model")
        raise OpdkitError(f"--model '{path}': is a training run directory; {hint}")


def _check_prompts(benchmarks, tokenizer, context: int | None, max_new_tokens: int, log) -> None:
    """Every prompt renders, and fits the model's ``context`` (an error names the benchmark and problem); a
    warning counts the prompts whose response budget runs past it."""
    from opdkit.data.chat import render_chat
    from opdkit.data.jsonl import DataError
    from opdkit.errors import InputError

    over = 0
    for b in benchmarks:
        for p in b.problems:
            chars = sum(len(m["content"]) for m in p.messages)
            try:  # no tokenizer packs more than 64 characters into a token: a far longer text is not tokenized
                n = len(render_chat(tokenizer, p.messages)) if context is None or chars < 64 * context else None
            except InputError as exc:
                raise DataError(f"benchmark {b.name}, {p.source}: {exc}") from None
            if context is not None and (n is None or n >= context):
                raise DataError(f"benchmark {b.name}, {p.source}: the prompt is {'far ' if n is None else ''}longer "
                                f"than the model's context ({n or '>' + str(context)} of {context} tokens)")
            if context is not None and n + max_new_tokens > context:
                over += 1
    if over:
        log(f"warning: {over} prompt(s) plus --max-new-tokens {max_new_tokens} run past the model's context of "
            f"{context} tokens; their answers may be cut short or degrade")


def _compare_manifest(old: dict, new: dict, out: Path) -> None:
    changed = []
    for key in ("model_sha256", "chat_template_sha256"):
        if old.get(key) != new.get(key):
            changed.append(key.replace("_sha256", ""))
    old_s, new_s = dict(old.get("settings", {})), dict(new["settings"])
    old_s.pop("n_samples", None)
    new_s.pop("n_samples", None)
    for k in sorted(set(old_s) | set(new_s)):
        if old_s.get(k) != new_s.get(k):
            changed.append(f"{k} ({old_s.get(k)!r} -> {new_s.get(k)!r})")
    for name, b in new["benchmarks"].items():
        ob = old.get("benchmarks", {}).get(name)
        if ob is not None and ob.get("digest") != b["digest"]:
            changed.append(f"benchmark {name}'s problems (file, fields, template or --max-problems)")
    if changed:
        raise OpdkitError(f"--out '{out}': holds an evaluation with other settings; changed: {'; '.join(changed)}. "
                          "Continue it with the same settings (a larger --n or a new benchmark may be added), or "
                          "give a new --out")


def summarise_samples(rows: Sequence[dict], benchmarks: Sequence[str], n: int, ks=None) -> dict:
    """``summary.json``'s content from sample rows: per benchmark (in order) and their mean."""
    from opdkit.eval.metrics import summarise_average, summarise_benchmark

    per = []
    for name in benchmarks:
        mine = [r for r in rows if r["benchmark"] == name and r["sample"] < n]
        problems = sorted({r["problem"] for r in mine})
        by = {(r["problem"], r["sample"]): r for r in mine}
        if not problems or any((p, j) not in by for p in problems for j in range(n)):
            raise OpdkitError(f"benchmark {name}: samples are missing; run the evaluation again to complete them")
        ordered = [by[(p, j)] for p in problems for j in range(n)]
        per.append(summarise_benchmark(
            name, [[by[(p, j)]["correct"] for j in range(n)] for p in problems], ks=ks,
            lengths=[r["tokens"] for r in ordered], truncated=[r["truncated"] for r in ordered],
            statuses=[r["status"] for r in ordered]))
    return {"benchmarks": per, "average": summarise_average(per)}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def format_table(summary: dict, markdown: bool = False) -> str:
    """The summary as a table (plain text, or Markdown for ``summary.md``)."""
    per = summary["benchmarks"]
    ks = sorted({int(k) for b in per for k in b["pass@k"]} - {1})
    head = ["benchmark", "problems", "n", "avg@n % (95% CI)"] + [f"pass@{k} %" for k in ks] + [
        "length", "truncated %", "no answer %"]
    rows = []
    for b in per:
        lo, hi = b["avg@n_ci"]
        rows.append([b["benchmark"], str(b["problems"]), str(b["n"]), f"{_pct(b['avg@n'])} ({_pct(lo)}–{_pct(hi)})"]
                    + [_pct(b["pass@k"].get(str(k))) for k in ks]
                    + ["—" if b["response_length"] is None else f"{b['response_length']:.0f}",
                       _pct(b["truncation_rate"]), _pct(b["no_answer_rate"])])
    if len(per) > 1:
        a = summary["average"]
        lo, hi = a["avg@n_ci"]
        rows.append(["average", "", "", f"{_pct(a['avg@n'])} ({_pct(lo)}–{_pct(hi)})"] + [""] * (len(head) - 4))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows]) + "\n"


def _env_failures(rows, names) -> dict[str, tuple[int, int, str]]:
    """Per game benchmark with failed episodes: ``(failed, episodes, the first failure's words)``."""
    out: dict[str, tuple[int, int, str]] = {}
    for name in sorted(names):
        mine = [r for r in rows if r["benchmark"] == name]
        failed = [r for r in mine if str(r.get("status", "")).startswith("failure:")]
        if failed:
            out[name] = (len(failed), len(mine), str(failed[0]["status"]).removeprefix("failure:").strip())
    return out


def _batches(benchmarks, games, settings, env, model, tokenizer, todo, pool, timings):
    """The graded samples of ``todo``, batch by batch: answers to problems, then episodes of games."""
    from opdkit.envs.base import template_from_config
    from opdkit.envs.episodes import EpisodeSettings
    from opdkit.envs.evaluate import EpisodeEvaluator
    from opdkit.eval.evaluator import SamplingEvaluator

    texts = [b for b in benchmarks if b not in games]

    def local(group):
        where = {benchmarks.index(b): i for i, b in enumerate(group)}
        return [(where[b], p, j) for b, p, j in todo if b in where]

    if local(texts):
        yield from SamplingEvaluator(texts, settings).run(model, tokenizer, local(texts), pool=pool, timings=timings)
    if local(games):
        episodes = EpisodeEvaluator(games, settings, template=template_from_config(env),
                                    episode=EpisodeSettings.from_config(env), processes=env.processes,
                                    timeout_s=env.step_timeout_s)
        yield from episodes.samples(model, tokenizer, local(games))


def run_eval(
    model_path: str,
    specs: Sequence[str],
    out_dir: str | Path,
    settings,
    *,
    fields: dict | None = None,
    template: str | None = None,
    system: str | None = None,
    max_problems: int = 0,
    ks: Sequence[int] | None = None,
    device: str = "auto",
    precision: str = "auto",
    chat_template: str = "model",
    trust_remote_code: bool = False,
    progress: bool = True,
    threads: int = 0,
    log=None,
    stop_requested=None,
    env=None,
    given: Collection[str] = (),
) -> dict:
    """Evaluate the model in ``model_path`` on the benchmarks ``specs`` (see :mod:`opdkit.eval.benchmarks`)
    with ``settings`` (:class:`~opdkit.eval.evaluator.EvalSettings`); write and return the summary.

    Everything is validated (output directory, benchmark files, model, chat template, an existing
    evaluation's settings) before the first file is written. ``stop_requested()`` is asked after every
    batch; True raises ``KeyboardInterrupt`` there (a signal whose exception a library swallowed, e.g. inside
    in-process grading, still stops the run). ``env``: an :class:`opdkit.config.EnvConfig` for environment
    benchmarks (``textworld:DIR``, ``alfworld:SPLIT``, JSONL of ``env`` lines): each sample is then an episode,
    correct when won. ``given``: the command-line flags given that act on one kind of benchmark only
    (``--max-new-tokens`` on problems, the game flags on games); one given with no benchmark of its kind is
    refused.
    """
    import torch

    from opdkit.data.chat import apply_chat_template_setting
    from opdkit.eval.benchmarks import DEFAULT_TEMPLATE, load_benchmarks
    from opdkit.eval.grading import GradingPool
    from opdkit.hf import load_causal_lm, load_tokenizer, model_dir_digest
    from opdkit.modeling import context_length
    from opdkit.train.precision import resolve_precision

    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr)

    out = Path(out_dir).expanduser()
    resume = _check_out_dir(out)
    if ks is not None:
        bad = [k for k in ks if not isinstance(k, int) or k < 1 or k > settings.n_samples]
        if bad:
            raise OpdkitError(f"--k {', '.join(map(str, bad))}: pass@k needs 1 <= k <= n = {settings.n_samples}")
    from opdkit.config import EnvConfig
    from opdkit.envs.data import env_defaults
    from opdkit.envs.evaluate import is_env_benchmark

    env = env if env is not None else EnvConfig()
    benchmarks = load_benchmarks(list(specs), fields=fields, template=template or DEFAULT_TEMPLATE, system=system,
                                 max_problems=max_problems, env_defaults=env_defaults(env),
                                 alfworld_data=env.alfworld_data)
    games = [b for b in benchmarks if is_env_benchmark(b)]
    if "--max-new-tokens" in given and len(games) == len(benchmarks):
        raise OpdkitError("--max-new-tokens: given, but every benchmark is a game, whose turns are --max-turn-tokens "
                          "long; drop it")
    unread = sorted(f for f in given if f != "--max-new-tokens") if not games else []
    if unread:
        raise OpdkitError(f"{', '.join(unread)}: given, but no benchmark is a game; drop "
                          f"{'it' if len(unread) == 1 else 'them'}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise OpdkitError("--device cuda: this machine has no usable CUDA GPU (or torch is a CPU build)")
    dev = torch.device(device)
    prec = resolve_precision(precision, dev, log=log, key="--precision")
    from opdkit.threads import configure_threads

    configure_threads(threads)
    _check_model_dir(Path(model_path))
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    apply_chat_template_setting(tokenizer, chat_template, key="--chat-template", where=f"--model '{model_path}'")
    manifest = {
        "model": str(Path(model_path).resolve()),
        "model_sha256": model_dir_digest(model_path),
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "settings": {**dataclasses.asdict(settings), "fallbacks": list(settings.fallbacks),
                     "precision": prec.name, "device": dev.type},
        "benchmarks": {b.name: {"source": b.source, "problems": len(b.problems), "digest": _digest_problems(b)}
                       for b in benchmarks},
    }
    manifest["settings"].pop("batch_size")  # neither changes a sample
    manifest["settings"].pop("grading_processes")
    if settings.greedy:  # not used by greedy decoding
        manifest["settings"]["temperature"] = manifest["settings"]["top_p"] = None
    if games:  # what an episode depends on
        manifest["settings"]["env"] = {k: getattr(env, k) for k in ("max_turns", "max_turn_tokens",
                                                                    "max_episode_tokens", "admissible_commands",
                                                                    "system_prompt")}
    if resume:
        try:
            old = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OpdkitError(f"--out '{out}': its {MANIFEST_FILE} cannot be read ({exc}); give a new --out") from None
        _compare_manifest(old, manifest, out)
        manifest["benchmarks"] = {**old.get("benchmarks", {}), **manifest["benchmarks"]}
        manifest["settings"]["n_samples"] = max(settings.n_samples, old.get("settings", {}).get("n_samples", 0))
    model = load_causal_lm(model_path, dtype="bfloat16" if prec.name == "bf16" and dev.type == "cuda" else "float32",
                           trust_remote_code=trust_remote_code, device=dev)
    _check_prompts([b for b in benchmarks if b not in games], tokenizer, context_length(model),
                   settings.max_new_tokens, log)
    if games:
        from opdkit.envs.episodes import fit_episode_budget

        env = fit_episode_budget(env, context_length(model), key="--max-episode-tokens", log=log)

    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    (out / EVAL_MARKER).touch()
    write_text_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    rows = read_samples(out)
    done = {(r["benchmark"], r["problem"], r["sample"]) for r in rows}
    todo = [(b, p, j) for b, bench in enumerate(benchmarks) for p in range(len(bench.problems))
            for j in range(settings.n_samples) if (bench.name, p, j) not in done]
    if resume:
        log(f"opdkit eval: continuing in {out}: {len(rows)} samples already there, {len(todo)} to go")
    timings: dict = {}
    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="eval", unit="answer", dynamic_ncols=True)
    pool = None
    if settings.grading_processes > 0 and any(b.grader is None for b in benchmarks if b not in games):
        pool = GradingPool(settings.grading_processes, timeout_s=settings.grading_timeout_s)
    try:
        with open(out / SAMPLES_FILE, "a", encoding="utf-8") as f, prec.autocast():
            for batch in _batches(benchmarks, games, settings, env, model, tokenizer, todo, pool, timings):
                lines = [dataclasses.asdict(s) for s in batch]
                f.write("".join(_jsonl_line(r) for r in lines))
                f.flush()
                os.fsync(f.fileno())
                rows.extend(lines)
                if stop_requested is not None and stop_requested():
                    raise KeyboardInterrupt
                if bar is not None:
                    bar.update(len(batch))
                    acc = sum(r["correct"] for r in rows) / len(rows)
                    bar.set_postfix(correct=f"{acc:.1%}")
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
    lock.close()
    summary = summarise_samples(rows, [b.name for b in benchmarks], settings.n_samples, ks)
    summary["model"] = manifest["model"]
    summary["settings"] = manifest["settings"] | {"n_samples": settings.n_samples}
    summary["seconds"] = {"total": round(time.perf_counter() - t0, 2),
                          "generate": round(timings.get("generate_s", 0.0), 2),
                          "grade": round(timings.get("grade_s", 0.0), 2), "samples": len(todo)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    game_names = {b.name for b in games}
    truncated = [b for b in summary["benchmarks"] if (b["truncation_rate"] or 0) > 0.1 and b["benchmark"] not in
                 game_names]
    failures = _env_failures(rows, game_names)
    for name, (count, total, example) in failures.items():
        log(f"warning: {count} of {total} episodes of {name} ended by an environment failure (counted as not won), "
            f"e.g. {example}")
    if truncated:
        worst = max(truncated, key=lambda b: b["truncation_rate"])
        log(f"warning: {worst['truncation_rate']:.0%} of {worst['benchmark']}'s answers hit --max-new-tokens "
            f"{settings.max_new_tokens} and were cut (no answer counts as wrong); reasoning models need thousands "
            "of tokens: raise --max-new-tokens")
    s = settings
    how = "greedy" if s.greedy else f"temperature {s.temperature}, top-p {s.top_p}"
    budget = []
    if len(games) < len(benchmarks):
        budget.append(f"at most {s.max_new_tokens} new tokens per answer")
    if games:
        budget.append(f"episodes of at most {env.max_turns} turns of {env.max_turn_tokens} tokens and "
                      f"{env.max_episode_tokens} tokens in all")
    notes = "".join(f"\n{name}: {count} of {total} episodes ended by an environment failure (counted as not won), "
                    f"e.g. {example}.\n" for name, (count, total, example) in failures.items())
    write_text_atomic(out / "summary.md", f"# Evaluation of `{manifest['model']}`\n\n{s.n_samples} sample(s) per "
                      f"problem, {how}, {', '.join(budget)}; avg@n and pass@k in %, 95% intervals over "
                      f"problems.\n\n" + format_table(summary, markdown=True) + notes)
    return summary
