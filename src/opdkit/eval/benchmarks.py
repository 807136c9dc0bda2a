"""Benchmarks: problem sets with reference answers, from the user's files or built in.

A benchmark is named by a spec ``NAME=SOURCE`` (or a built-in ``SOURCE`` alone):

- a file: ``.jsonl``, ``.json`` (an array of records, or an object holding one) or ``.parquet``;
- ``hf:DATASET[:SPLIT]``: a dataset through the ``datasets`` library (machine online or its cache filled);
  the split defaults to ``test``;
- built in: ``demo`` (the demo's arithmetic task, eval split) and ``rg:TASK`` (a reasoning-gym task,
  procedural and offline, graded by its own verifier), e.g. ``rg:chain_sum``.

Columns. A spec may name them: ``NAME=FILE#prompt=COLUMN,answer=COLUMN`` (``fields=`` gives a default).
Otherwise the problem is read from the first of ``prompt``, ``problem``, ``question``, ``Problem``,
``Question``, ``input`` that a record has; the reference answer from the first of ``answer``,
``final_answer``, ``Answer``, ``expected_answer``, ``gold``, ``target``, and failing those from the last
``\\boxed{}`` of ``solution``. These cover the public releases of MATH500 (problem/answer), AIME24 and
AIME25 (problem or Problem or question / answer or Answer), Minerva (question/answer, or problem/solution
as in Qwen2.5-Math's evaluation data), OlympiadBench (question/final_answer, a list: several answers are
joined by ", ") and GSM8K (question/answer, the answer being a worked solution whose line ``#### 72``
gives the reference: a benchmark named gsm8k requires it); a ``context`` column (OlympiadBench) is put
before the problem. A reference holding ``\\boxed{}`` (a worked solution) is its last box; ``$`` are
removed from list items. A reference must be text, a number or a list of them (not a boolean, NaN or an
object). The training format (``prompt`` as text or chat messages, ``answer``) is a benchmark file too.

Prompts. A ``prompt`` column is used as it is (it is what the model was trained to see); chat messages must
end with the turn the model answers. A problem from any other column becomes one user message
``template.format(problem=text)``; the default template appends Qwen2.5-Math's instruction "Please reason
step by step, and put your final answer within \\boxed{}.". The ``demo`` built-in keeps its own prompts
(those its models were trained on). ``system`` is put before every prompt that has no system message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from opdkit.data.jsonl import DataError, read_jsonl
from opdkit.data.prompts import PromptRecord, _messages

__all__ = ["Benchmark", "DEFAULT_TEMPLATE", "is_env_spec", "load_benchmark", "load_benchmarks",
           "parse_benchmark_spec"]

DEFAULT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
PROMPT_COLUMNS = ("prompt", "problem", "question", "Problem", "Question", "input")
ANSWER_COLUMNS = ("answer", "final_answer", "Answer", "expected_answer", "gold", "target")
SOLUTION_COLUMNS = ("solution", "Solution")

@dataclass
class Benchmark:
    """A problem set: ``problems`` (``PromptRecord``s with a reference ``answer``; ``source`` names the file
    and record), where it came from, and its grader: ``None`` for math grading (``opdkit.eval.grade``:
    extraction and symbolic equivalence, run in worker processes), or ``grader(response, index) -> bool``
    for a task with its own verifier (run in this process)."""

    name: str
    problems: list[PromptRecord]
    source: str
    grader: Callable[[str, int], bool] | None = None


def _is_gsm8k(name: str) -> bool:
    return re.sub(r"[^a-z0-9]", "", name.lower()) == "gsm8k"


RESERVED_NAMES = ("average",)  # a row of the summary table


def parse_benchmark_spec(spec: str) -> tuple[str, str]:
    """``"NAME=SOURCE"`` -> ``(NAME, SOURCE)``; a lone built-in or file gets a name from it. A field mapping
    suffix (``#prompt=COLUMN,answer=COLUMN``) stays on SOURCE (see :func:`split_fields`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"benchmark {spec!r}: expected NAME=FILE, hf:DATASET, demo or rg:TASK")
    head, hash_, mapping = spec.partition("#")
    name, sep, source = head.partition("=")
    if not sep:
        source = head
        if head.startswith(("rg:", "hf:")):
            name = head.split(":", 1)[1].split(":")[0].rsplit("/", 1)[-1]
        elif head.startswith("textworld:"):
            name = "textworld"
        elif head.startswith("alfworld:"):
            name = "alfworld-" + head.split(":", 1)[1]
        else:
            name = Path(head).stem if head != "demo" else "demo"
    name, source = name.strip(), source.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise DataError(f"benchmark {spec!r}: the name {name!r} must be letters, digits, '_', '-' or '.'")
    if name in RESERVED_NAMES:
        raise DataError(f"benchmark {spec!r}: the name {name!r} is reserved (the summary's row over benchmarks); "
                        "give it another NAME=...")
    if not source:
        raise DataError(f"benchmark {spec!r}: no file or dataset after '='")
    return name, source + hash_ + mapping


def split_fields(source: str, where: str) -> tuple[str, dict[str, str]]:
    """``"FILE#prompt=q,answer=a"`` -> ``("FILE", {"prompt": "q", "answer": "a"})``."""
    path, hash_, mapping = source.partition("#")
    fields: dict[str, str] = {}
    if hash_:
        for item in mapping.split(","):
            key, sep, column = item.partition("=")
            key, column = key.strip(), column.strip()
            if not sep or key not in ("prompt", "answer") or not column:
                raise DataError(f"benchmark {where}: field mapping {item!r}: expected prompt=COLUMN or "
                                "answer=COLUMN (as in FILE#prompt=question,answer=final)")
            if key in fields:
                raise DataError(f"benchmark {where}: field {key!r} mapped twice")
            fields[key] = column
    return path.strip(), fields


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs of a JSONL, JSON or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [(f"{path} line {n}", obj) for n, obj in read_jsonl(path, what="benchmark file")]
    if not path.exists():
        hint = "" if suffix in (".json", ".parquet") else (
            " (a file needs a .jsonl, .json or .parquet name; the built-ins are demo and rg:TASK)")
        raise DataError(f"benchmark file '{path}': no such file{hint}")
    if not path.is_file():
        raise DataError(f"benchmark file '{path}': not a file")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"benchmark file '{path}': not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # JSON Lines in a .json file, as several Hugging Face releases ship
                return [(f"{path} line {n}", obj) for n, obj in read_jsonl(path, what="benchmark file")]
            raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"benchmark file '{path}': expected a JSON array of records (or an object holding "
                                f"exactly one array), got an object with keys {', '.join(list(data)[:5])}")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"benchmark file '{path}': expected a JSON array of records, got {type(data).__name__}")
        out = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path} record {i} (0-based): expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path} record {i} (0-based)", rec))
        return out
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"benchmark file '{path}': reading Parquet needs pyarrow (pip install pyarrow, or "
                            "pip install 'opdkit[eval]')") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"benchmark file '{path}': not a readable Parquet file ({exc})") from None
        return [(f"{path} row {i} (0-based)", rec) for i, rec in enumerate(rows)]
    raise DataError(f"benchmark file '{path}': unknown format '{suffix or '(none)'}' (expected .jsonl, .json or "
                    ".parquet)")


def _from_hub(source: str) -> list[tuple[str, dict]]:
    dataset, _, split = source[3:].partition(":")
    split = split or "test"
    try:
        import datasets
    except ImportError:
        raise DataError(f"benchmark '{source}': loading a dataset by name needs the datasets package "
                        "(pip install datasets); or download it and pass the file") from None
    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: datasets raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"benchmark '{source}': could not load dataset {dataset!r} split {split!r} ({first:.200}); "
                        "offline machines need a local file: NAME=path/to/file.jsonl") from None
    return [(f"{source} row {i} (0-based)", dict(rec)) for i, rec in enumerate(ds)]


def _gold(value, where: str, column: str, gsm8k: bool) -> str:
    from opdkit.eval.answers import _last_boxed

    if isinstance(value, list):  # OlympiadBench: a list (one item, several answers comma-joined inside it)
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise DataError(f"{where}: field '{column}' must be a list of answers (text or numbers), got {value!r:.80}")
        items = [str(v).replace("$", "").strip() for v in value]
        items = [v for v in items if v]
        if not items:
            raise DataError(f"{where}: field '{column}' is an empty list (no reference answer)")
        return ", ".join(items)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field '{column}' must be text or a number, got {type(value).__name__} "
                        f"{value!r:.60}")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(f"{where}: field '{column}' is {value} (no reference answer)")
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    if "####" in text:  # GSM8K: the worked solution's last line "#### 1,234"
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif gsm8k:
        raise DataError(f"{where}: field '{column}' has no '#### N' line (a GSM8K answer is a worked solution "
                        "ending with its result)")
    elif "\\boxed" in text or "\\fbox" in text:  # a worked solution: its last box is the answer
        boxed = _last_boxed(text)
        if not boxed:
            raise DataError(f"{where}: field '{column}' holds a \\boxed{{}} that is empty or never closed")
        text = boxed
    if not text:
        raise DataError(f"{where}: field '{column}' is empty (no reference answer)")
    return text


_FIELD_HINT = "name it in the spec, NAME=FILE#{key}=COLUMN (opdkit eval also takes --field {key}=COLUMN)"


def _problem(rec: dict, where: str, fields: Mapping[str, str], template: str, system: str | None,
             gsm8k: bool = False) -> PromptRecord:
    from opdkit.eval.answers import _last_boxed

    pcol = fields.get("prompt") or next((c for c in PROMPT_COLUMNS if c in rec), None)
    if pcol is None or pcol not in rec:
        want = f"'{fields['prompt']}'" if fields.get("prompt") else "one of " + ", ".join(PROMPT_COLUMNS)
        raise DataError(f"{where}: no problem field ({want}; it has {', '.join(list(rec)[:8])}); "
                        + _FIELD_HINT.format(key="prompt"))
    acol = fields.get("answer") or next((c for c in ANSWER_COLUMNS if rec.get(c) is not None), None)
    if acol is not None and acol in rec and rec[acol] is not None:
        answer = _gold(rec[acol], where, acol, gsm8k)
    else:
        scol = None if fields.get("answer") else next((c for c in SOLUTION_COLUMNS if c in rec), None)
        boxed = None
        if scol is not None:
            sol = rec[scol]
            boxed = _last_boxed(sol if isinstance(sol, str) else " ".join(map(str, sol or [])))
        if not boxed:
            want = f"'{fields['answer']}'" if fields.get("answer") else (
                "one of " + ", ".join(ANSWER_COLUMNS) + ", or a solution with \\boxed{}")
            raise DataError(f"{where}: no reference answer ({want}; it has {', '.join(list(rec)[:8])}); "
                            + _FIELD_HINT.format(key="answer"))
        answer = boxed
    value = rec[pcol]
    if pcol == "prompt" or isinstance(value, list):
        messages = _messages(value, where, pcol)
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: field '{pcol}' ends with an assistant message: a benchmark prompt ends with "
                            "the turn the model answers (user or tool)")
    else:
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{pcol}' must be the problem's text, got {type(value).__name__} "
                            f"{value!r:.60}")
        text = value.strip()
        if not text:
            raise DataError(f"{where}: field '{pcol}' is an empty problem")
        context = rec.get("context")  # OlympiadBench: a shared preamble of some problems
        if isinstance(context, str) and context.strip():
            text = context.strip() + "\n\n" + text
        messages = ({"role": "user", "content": template.format(problem=text)},)
    if system and messages[0]["role"] != "system":
        messages = ({"role": "system", "content": system},) + tuple(messages)
    return PromptRecord(tuple(messages), answer, None, where)


def _check_template(template: str) -> None:
    try:
        template.format(problem="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"prompt template {template!r}: must contain {{problem}} and no other field; literal "
                        f"braces are written {{{{ }}}} ({exc})") from None
    if "{problem}" not in template.replace("{{", "").replace("}}", ""):
        raise DataError(f"prompt template {template!r}: must contain {{problem}}")


def _demo_benchmark(name: str, count: int | None, seed: int) -> Benchmark:
    from opdkit.demo.settings import DemoSettings
    from opdkit.demo.task import chat_messages, make_problems

    settings = DemoSettings()
    problems = make_problems(count or settings.eval_problems, seed, "eval", settings.task)
    records = [PromptRecord(tuple(chat_messages(p)), p.answer, "demo", f"demo problem {i}")
               for i, p in enumerate(problems)]
    return Benchmark(name, records, "demo (eval split)")


def _reasoning_gym_benchmark(name: str, task: str, count: int | None, seed: int, template: str) -> Benchmark:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError(f"benchmark 'rg:{task}': needs reasoning-gym (pip install reasoning-gym, or "
                        "pip install 'opdkit[eval]')") from None
    if task not in DATASETS:
        import difflib

        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (it has {len(DATASETS)} tasks)"
        raise DataError(f"benchmark 'rg:{task}': no such reasoning-gym task{hint}")
    ds = reasoning_gym.create_dataset(task, size=count or 100, seed=seed)
    entries = list(ds)
    records = [PromptRecord(({"role": "user", "content": template.format(problem=e["question"])},),
                            str(e["answer"]), task, f"rg:{task} item {i}") for i, e in enumerate(entries)]

    def grader(response: str, index: int, _fallbacks=()) -> bool:
        from opdkit.eval.answers import extract_answer

        answer = extract_answer(response, _fallbacks)
        if answer is None:
            return False
        try:
            return float(ds.score_answer(answer, entries[index])) >= 1.0
        except Exception:  # a verifier that chokes on a malformed answer: wrong, not a crash
            return False

    return Benchmark(name, records, f"reasoning-gym {task} (seed {seed})", grader)


def load_benchmark(
    spec: str,
    *,
    fields: Mapping[str, str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    system: str | None = None,
    max_problems: int = 0,
    seed: int = 0,
    env_defaults=None,
    alfworld_data: str | None = None,
) -> Benchmark:
    """Load one benchmark from ``spec`` (see the module docstring). ``DataError`` names the file and record.

    Args:
        fields: column names ``{"prompt": ..., "answer": ...}`` for a file of another schema.
        template: how a problem's text becomes the user message (``{problem}``); ``prompt`` columns skip it.
        system: a system message put before every prompt that has none.
        max_problems: keep the first this many problems (0 = all); the size of a built-in task.
        seed: seed of a built-in task's problems (0 by default, and in ``opdkit eval`` and the trainer, so that
            a benchmark is the same problem set whatever the sampling seed).
        env_defaults, alfworld_data: for environment benchmarks (``textworld:DIR``, ``alfworld:SPLIT``, a JSONL
            file of ``env`` lines): the arguments every environment of a kind gets, and ALFWorld's data folder.
    """
    name, source = parse_benchmark_spec(spec)
    if source.startswith(("textworld:", "alfworld:")) or _is_env_file(source):
        return _env_benchmark(name, source, max_problems, env_defaults or {}, alfworld_data)
    source, own_fields = split_fields(source, name)
    fields = {**dict(fields or {}), **own_fields}  # the spec's own mapping wins over the caller's default
    unknown = set(fields) - {"prompt", "answer"}
    if unknown:
        raise DataError(f"benchmark {name}: unknown field mapping {', '.join(sorted(unknown))} (expected prompt=COLUMN "
                        "and/or answer=COLUMN)")
    _check_template(template)
    if own_fields and (source == "demo" or source.startswith(("rg:",))):
        raise DataError(f"benchmark {name}: a field mapping applies to files and datasets, not to {source}")
    if source == "demo":
        bench = _demo_benchmark(name, max_problems or None, seed)
    elif source.startswith("rg:"):
        bench = _reasoning_gym_benchmark(name, source[3:], max_problems or None, seed, template)
    else:
        rows = _from_hub(source) if source.startswith("hf:") else _read_records(Path(source).expanduser())
        if max_problems:
            rows = rows[:max_problems]
        if not rows:
            raise DataError(f"benchmark {name}: '{source}' holds no problems")
        gsm8k = _is_gsm8k(name) and not fields.get("answer")
        bench = Benchmark(name, [_problem(rec, where, fields, template, system, gsm8k) for where, rec in rows],
                          source)
    if system and (source == "demo" or source.startswith("rg:")):
        bench.problems = [PromptRecord(({"role": "system", "content": system},) + p.messages, p.answer, p.task,
                                       p.source) for p in bench.problems]
    return bench


def is_env_spec(spec: str) -> bool:
    """Whether benchmark ``spec`` names games (``textworld:DIR``, ``alfworld:SPLIT``, a JSONL of env lines)."""
    _, source = parse_benchmark_spec(spec)
    return source.startswith(("textworld:", "alfworld:")) or _is_env_file(source)


def _is_env_file(source: str) -> bool:
    """A JSONL file whose first record is an environment line (``{"env": ...}``)."""
    path = Path(source.partition("#")[0]).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict) and "env" in json.loads(line)
                except ValueError:
                    return False
    return False


def _env_benchmark(name: str, source: str, max_problems: int, env_defaults, alfworld_data) -> Benchmark:
    """A benchmark of environments: games played to a win (:mod:`opdkit.envs.evaluate`)."""
    from opdkit.data.prompts import load_prompts
    from opdkit.envs.data import env_source_records, is_env_source

    if is_env_source(source):
        records = env_source_records(source, name, env_defaults, alfworld_data=alfworld_data)
    else:
        records = load_prompts(source, env_defaults=env_defaults)
        if any(r.env is None for r in records):
            raise DataError(f"benchmark {name}: '{source}' mixes prompts and environments; give each its own file")
    if max_problems:
        records = records[:max_problems]
    return Benchmark(name, records, source)


def load_benchmarks(specs: Sequence[str], **kwargs) -> list[Benchmark]:
    """Load several benchmarks; their names must differ."""
    out = [load_benchmark(s, **kwargs) for s in specs]
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"two benchmarks are named {', '.join(dup)}: give each its own NAME=...")
    return out
