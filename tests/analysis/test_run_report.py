"""The run diagnostics report on synthetic metrics.jsonl files."""

from __future__ import annotations

import json
import math

import pytest

from opdkit.analysis.run_report import MetricsError, flags, load_metrics, main_run_report, run_report, summarize


def _line(step: int, n: int) -> dict:
    frac = step / max(1, n - 1)
    return {
        "step": step,
        "loss": 1.0 - 0.5 * frac,
        "negative_reward_frac": 0.71,
        "reward_skew": -2.5,
        "k1": 0.4 + frac,
        "teacher_support_mass": 0.9 - 0.5 * frac,
        "student_support_mass": 0.8 - 0.6 * frac,
        "sampled_outside_support_frac": 0.05 + 0.3 * frac,
        "special_masked_frac": 0.01,
        "rollout_tail_mass": 0.08 + 0.9 * frac,  # the sampled-token top-p collapse onto the pad token
        "entropy": 2.0 * (1 - 0.8 * frac),
        "grad_norm": 100.0 if step == 7 else 1.0,
        "response_length": 300.0,
        "truncation_rate": 0.0,
        "tokens_per_s": 1234.5,
        "extra_key": "ignored",
    }


def _write(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_on_synthetic_run_with_missing_keys(tmp_path):
    n = 20
    records = [_line(s, n) for s in range(n)]
    del records[3]["entropy"], records[3]["k1"]  # a line with missing keys
    records[4]["grad_norm"] = None
    records[5] = {"step": 5}  # only the step
    _write(tmp_path / "metrics.jsonl", records, raw_lines=[""])  # trailing blank line
    report = run_report(tmp_path)
    assert report == tmp_path / "run_report.md"
    text = report.read_text()
    for png in ("failure_modes.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in text
    assert "negative rewards are the majority (71%" in text
    assert "entropy fell by 80%: possible collapse" in text
    assert "skewed to the negative side" in text
    assert "grad-norm spikes" in text and "step 7" in text
    assert "fall outside the support" in text
    assert "where its rollouts never sample" in text and "a collapse no loss term sees" in text
    assert "| entropy | 18 |" in text  # 20 lines, 2 without entropy
    assert "| loss | 19 | 1 | 0.5 |" in text


def test_summary_values_and_quiet_run(tmp_path):
    records = [
        {"step": s, "loss": 2.0 - s, "negative_reward_frac": 0.3, "entropy": 1.0, "teacher_support_mass": 0.95}
        for s in range(4)
    ]
    m = load_metrics(_write(tmp_path / "metrics.jsonl", records))
    s = summarize(m)
    assert s["loss"]["first"] == 2.0 and s["loss"]["last"] == -1.0
    assert (s["loss"]["min"], s["loss"]["argmin"]) == (-1.0, 3)
    assert "k1" not in s
    assert flags(s) == []
    text = run_report(tmp_path, tmp_path / "out", plots=False).read_text()
    assert "none: no metric crossed a threshold" in text and "| k1 | 0 | not logged |" in text
    assert not (tmp_path / "out" / "failure_modes.png").exists()


def test_missing_step_is_numbered_and_nan_is_flagged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"loss": 1.0}\n{"loss": NaN, "step": null}\n{"step": 10, "loss": 0.5}\n')
    m = load_metrics(path)
    assert m.steps == [0, 1, 10]
    assert math.isnan(m.values["loss"][1])
    assert any("loss was NaN or infinite at 1 step(s) (first at step 1)" in f for f in flags(summarize(m)))


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"step": "three"}', "'step' must be an integer"),
        ('{"step": 3, "entropy": "high"}', "'entropy' must be a number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, match):
    path = _write(tmp_path / "metrics.jsonl", [_line(0, 3), _line(1, 3)], raw_lines=[bad])
    with pytest.raises(MetricsError, match=match) as info:
        run_report(tmp_path)
    assert f"{path} line 3:" in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(MetricsError, match="no such file") as info:
        run_report(tmp_path / "nope")
    assert str(tmp_path / "nope" / "metrics.jsonl") in str(info.value)
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("\n")
    with pytest.raises(MetricsError, match="no metrics lines"):
        load_metrics(empty)


def test_main_accepts_the_metrics_file_itself(tmp_path, capsys):
    path = _write(tmp_path / "metrics.jsonl", [_line(s, 5) for s in range(5)])
    assert main_run_report([str(path), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    assert "# Run diagnostics" in capsys.readouterr().out
    assert (tmp_path / "r" / "run_report.md").exists()
