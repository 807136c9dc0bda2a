"""The command line never destroys a user's files, bends on resume, survives preemption, and answers bad
input with a clear error (exit code, a message naming the file, line, key or argument, no traceback)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opdkit.cli import main
from opdkit.config import FIELD_KEYS
from opdkit.train.metrics import METRICS, read_metrics

NOT_COMPARED = {k for k in METRICS if k.startswith("time_")} | {"tokens_per_s"}
EXE = str(Path(sys.executable).parent / "opdkit")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    return path


def _args(dirs, data, out, *extra):
    return ["train", f"model.path={dirs['qwen2']}", f"teacher.path={dirs['llama']}", f"data.train_path={data}",
            "optim.total_steps=2", "rollout.max_new_tokens=6", "rollout.n_samples=2", "optim.prompts_per_step=2",
            "objective.top_k=4", "optim.lr=1e-2", "run.tensorboard=false", f"run.out_dir={out}", *extra]


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


# ------------------------------------------------------------------------------------------ nothing deleted
def test_overwrite_never_touches_a_folder_opdkit_did_not_create(tmp_path, tiny_model_dirs, data, capsys):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.yaml").write_text("mine: true\n")
    (proj / "src" / "main.py").write_text("print('hi')\n")
    (proj / "data.csv").write_text("a,b\n")
    before = sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*"))
    for extra in ([], ["run.overwrite=true"]):
        code, err = _run(capsys, _args(tiny_model_dirs, data, proj, *extra))
        assert code == 2 and f"run.out_dir '{proj}': the directory is not empty and was not created by opdkit" in err
    assert sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*")) == before
    assert (proj / "config.yaml").read_text() == "mine: true\n"
    # '.' (the current folder) is refused the same way
    code, err = _run(capsys, _args(tiny_model_dirs, data, tmp_path, "run.overwrite=true"))
    assert code == 2 and "not created by opdkit" in err and (proj / "data.csv").exists()


def test_overwrite_of_an_opdkit_run_removes_only_its_run_files(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run))[0] == 0
    (run / "notes.txt").write_text("my notes\n")
    code, err = _run(capsys, _args(tiny_model_dirs, data, run))
    assert code == 2 and "already holds a run" in err and f"opdkit train --resume {run}" in err
    assert _run(capsys, _args(tiny_model_dirs, data, run, "run.overwrite=true", "optim.total_steps=1"))[0] == 0
    assert (run / "notes.txt").read_text() == "my notes\n"
    assert [r["step"] for r in read_metrics(run)] == [1]  # the old run's metrics went with it


def test_a_failed_start_leaves_nothing_and_the_corrected_command_runs(tmp_path, tiny_model_dirs, data, capsys,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # without run.out_dir a run would go to ./runs/
    for bad, needle in [
        ([f"data.train_path={tmp_path / 'typo.jsonl'}"], f"data file '{tmp_path / 'typo.jsonl'}': no such file"),
        ([f"model.path={tmp_path / 'nomodel'}"], f"model.path: tokenizer '{tmp_path / 'nomodel'}': no such directory"),
        (["objective.special_tokens=['<|im_end|']"], "objective.special_tokens: '<|im_end|' is not one token"),
        (["model.lora_r=2", "model.lora_target_modules=[nonexistent_proj]"], "model.lora_target_modules"),
    ]:
        argv = [a for a in _args(tiny_model_dirs, data, "x") if not a.startswith("run.out_dir")] + bad
        code, err = _run(capsys, argv)
        assert code == 2 and needle in err, err
        assert not (tmp_path / "runs").exists()
    run = tmp_path / "run"
    code, err = _run(capsys, _args(tiny_model_dirs, data, run, f"data.train_path={tmp_path / 'typo.jsonl'}"))
    assert code == 2 and not run.exists()
    assert _run(capsys, _args(tiny_model_dirs, data, run))[0] == 0  # not refused as "already holds a run"


def test_a_typo_with_overwrite_does_not_destroy_a_finished_run(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run))[0] == 0
    rows, weights = read_metrics(run), _weights(run)
    code, err = _run(capsys, _args(tiny_model_dirs, data, run, "run.overwrite=true",
                                   f"data.train_path={tmp_path / 'typo.jsonl'}"))
    assert code == 2 and "no such file" in err
    assert read_metrics(run) == rows and all(torch.equal(weights[k], _weights(run)[k]) for k in weights)


# ------------------------------------------------------------------------------------------------- resume
def test_resume_with_a_moved_model_and_more_steps(tmp_path, tiny_model_dirs, data, capsys):
    student = shutil.copytree(tiny_model_dirs["qwen2"], tmp_path / "student")
    straight = tmp_path / "straight"
    common = [a.replace(str(tiny_model_dirs["qwen2"]), str(student)) for a in _args(tiny_model_dirs, data, "x")]
    common = [a for a in common if not a.startswith(("run.out_dir", "optim.total_steps"))]
    assert _run(capsys, [*common, "optim.total_steps=4", f"run.out_dir={straight}"])[0] == 0
    run = tmp_path / "run"
    assert _run(capsys, [*common, "optim.total_steps=2", f"run.out_dir={run}"])[0] == 0
    moved = student.rename(tmp_path / "moved")
    code, err = _run(capsys, ["train", "--resume", str(run), "optim.total_steps=4"])
    assert code == 2 and f"model.path: tokenizer '{student}': no such directory" in err
    code, err = _run(capsys, ["train", "--resume", str(run), "objective.top_k=8", "optim.lr=0.1"])
    assert code == 2 and "objective.top_k, optim.lr cannot change when a run is resumed" in err
    assert main(["train", "--resume", str(run), f"model.path={moved}", "optim.total_steps=4"]) == 0
    assert f"resuming from {run / 'checkpoints' / 'step-000002'} (step 2 of 4)" in capsys.readouterr().out
    assert _strip(read_metrics(run)) == _strip(read_metrics(straight))  # extended = trained 4 steps at once
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert f"path: {moved}" in (run / "config.yaml").read_text()  # the run remembers where its model is now
    code, err = _run(capsys, ["train", "--resume", str(run), "optim.total_steps=1"])
    assert code == 2 and "optim.total_steps = 1 is below the checkpoint's step 4" in err


def test_an_unreadable_latest_checkpoint_offers_the_previous_one(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run, "optim.total_steps=3", "run.save_every=1"))[0] == 0
    latest = run / "checkpoints" / "step-000003" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # cut short, as a full disk would leave it
    code, err = _run(capsys, ["train", "--resume", str(run), "optim.total_steps=4"])
    assert code == 2 and "step-000003" in err and f"opdkit train --resume {run} --checkpoint 2" in err
    code, err = _run(capsys, ["train", "--resume", str(run), "optim.total_steps=4", "--checkpoint", "2"])
    assert code == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert (run / "checkpoints" / ".abandoned-step-000003").is_dir()
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-000003", "step-000004"]


# ---------------------------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_last_step_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dirs, data,
                                                                              sig):
    args = _args(tiny_model_dirs, data, "x", "optim.total_steps=30", "run.save_every=0")
    args = [a for a in args if not a.startswith("run.out_dir")]
    straight = tmp_path / "straight"
    r = subprocess.run([EXE, *args, f"run.out_dir={straight}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen([EXE, *args, f"run.out_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(run)) < 2:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and f"stopped by {sig.name} after step" in err
    assert f"{sig.name} received: finishing the current step" in err  # said at once, not when the step ends
    assert f"Continue with: opdkit train --resume {run}" in err
    done = len(read_metrics(run))
    assert 2 <= done < 30 and [c.name for c in (run / "checkpoints").iterdir()] == [f"step-{done:06d}"]
    r = subprocess.run([EXE, "train", "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _strip(read_metrics(run)) == _strip(read_metrics(straight))
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_output_paths_are_checked_before_any_work(tmp_path, tiny_model_dirs, data, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = _run(capsys, _args(tiny_model_dirs, data, a_file))
    assert code == 2 and f"run.out_dir '{a_file}': exists and is not a directory" in err
    code, err = _run(capsys, _args(tiny_model_dirs, data, a_file / "run"))
    assert code == 2 and "cannot be created" in err
    code, err = _run(capsys, ["analyze", "variance", "--out", str(a_file)])
    assert code == 2 and "--out" in err and "not a directory" in err
    code, err = _run(capsys, ["config", "--out", str(tmp_path)])
    assert code == 2 and "is a directory" in err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    code, err = _run(capsys, ["plot", str(empty)])
    assert code == 2 and "no metrics to plot" in err and not (empty / "plots").exists()
    code, err = _run(capsys, ["plot", str(tmp_path / "nope")])
    assert code == 2 and "no such run directory" in err


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"prompt": ""}', "line 2: field 'prompt' is an empty prompt"),
        ('{"prompt": [{"role": "robot", "content": "hi"}]}', "line 2: field 'prompt', message 0: unknown role 'robot'"),
        ('{"prompt": [{"role": "user"}]}', "line 2: field 'prompt', message 0: expected"),
        ('{"prompt": "ok", }', "line 2: not valid JSON (Expecting property name enclosed in double quotes at "
                              "column 18)"),  # the '}' where a name should be
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, tiny_model_dirs, line, needle, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n' + line + "\n")
    code, err = _run(capsys, _args(tiny_model_dirs, bad, tmp_path / "run"))
    assert code == 2 and f"{bad} {needle}" in err, err


def test_encodings_bom_and_binary_files(tmp_path, tiny_model_dirs, capsys):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "What is 1 + 1?"}\n{"prompt": "What is 2 + 2?"}\n')
    assert _run(capsys, _args(tiny_model_dirs, bom, tmp_path / "run", "optim.total_steps=1"))[0] == 0
    weights = Path(tiny_model_dirs["qwen2"]) / "model.safetensors"
    code, err = _run(capsys, _args(tiny_model_dirs, weights, tmp_path / "run2"))
    assert code == 2 and f"{weights} line 1: not UTF-8 text" in err
    code, err = _run(capsys, ["config", str(weights)])
    assert code == 2 and f"{weights} line" in err and "not UTF-8" in err


def test_prompt_overflow_error_skip_and_truncate(tmp_path, tiny_model_dirs, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n" + json.dumps({"prompt": "What is 2 + 2? " * 40})
                    + "\n")
    over = ["data.max_prompt_tokens=30", "optim.total_steps=1"]
    code, err = _run(capsys, _args(tiny_model_dirs, path, tmp_path / "a", *over))
    assert code == 2 and f"{path} line 2" in err and "data.prompt_overflow" in err
    code, _ = _run(capsys, _args(tiny_model_dirs, path, tmp_path / "b", *over, "data.prompt_overflow=skip"))
    assert code == 0
    code, _ = _run(capsys, _args(tiny_model_dirs, path, tmp_path / "c", *over, "data.prompt_overflow=truncate_left",
                                 "data.shuffle=false"))
    assert code == 0
    row = read_metrics(tmp_path / "c")[0]
    assert row["prompt_truncated_frac"] == 0.5  # one of the step's two prompts was cut to its last 30 tokens


def test_chat_template_setting_for_base_models(tmp_path, tiny_model_dirs, data, capsys):
    base = shutil.copytree(tiny_model_dirs["qwen2"], tmp_path / "base")
    for name in ("chat_template.jinja",):
        (base / name).unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = [a.replace(str(tiny_model_dirs["qwen2"]), str(base)) for a in _args(tiny_model_dirs, data, "x")]
    args = [a for a in args if not a.startswith(("run.out_dir", "optim.total_steps"))] + ["optim.total_steps=1"]
    code, err = _run(capsys, [*args, f"run.out_dir={tmp_path / 'a'}"])
    assert code == 2 and "model.chat_template: the tokenizer" in err and "model.chat_template=none" in err
    assert _run(capsys, [*args, "model.chat_template=none", f"run.out_dir={tmp_path / 'b'}"])[0] == 0
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")
    assert _run(capsys, [*args, f"model.chat_template={template}", f"run.out_dir={tmp_path / 'c'}"])[0] == 0
    code, err = _run(capsys, [*args, f"model.chat_template={tmp_path / 'none.jinja'}", f"run.out_dir={tmp_path / 'd'}"])
    assert code == 2 and "is neither 'model', 'none' nor a template file" in err


def test_check_device_errors(tiny_model_dirs, capsys):
    code, err = _run(capsys, ["check", "--student", str(tiny_model_dirs["qwen2"]), "--teacher",
                              str(tiny_model_dirs["llama"]), "--device", "gpu0"])
    assert code == 2 and "--device: 'gpu0' is not a device" in err
    if not torch.cuda.is_available():
        code, err = _run(capsys, ["check", "--student", str(tiny_model_dirs["qwen2"]), "--teacher",
                                  str(tiny_model_dirs["llama"]), "--device", "cuda"])
        assert code == 2 and "no usable CUDA GPU" in err


def test_config_explain_documents_every_field(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    missing = [k for k in FIELD_KEYS if f"  {k}  (" not in out]
    assert not missing
    assert "data.prompt_overflow  (str; default 'error'; one of error, skip, truncate_left)" in out
    help_text = subprocess.run([EXE, "train", "--help"], capture_output=True, text=True).stdout
    for needle in ("model.path", "teacher.path", "data.train_path", '{"prompt":', "run.out_dir", "75"):
        assert needle in help_text


# ---------------------------------------------------------------- found by a second new-user review
def test_resume_refuses_a_folder_opdkit_did_not_create(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run, "optim.total_steps=1"))[0] == 0
    mine = tmp_path / "mine"
    (mine / "final").mkdir(parents=True)
    shutil.copy(run / "config.yaml", mine / "config.yaml")
    (mine / "final" / "README.md").write_text("card\n")
    (mine / "metrics.jsonl").write_text('{"my": 1}\n')
    code, err = _run(capsys, ["train", "--resume", str(mine)])
    assert code == 2 and "not a run directory opdkit created" in err
    assert (mine / "final" / "README.md").read_text() == "card\n"
    assert (mine / "metrics.jsonl").read_text() == '{"my": 1}\n'
    assert not (mine / "checkpoints").exists()


def test_overwrite_keeps_user_files_inside_the_runs_folders(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run))[0] == 0
    assert main(["plot", str(run)]) == 0
    for rel in ("final/MY_README.md", "checkpoints/mine.txt", "plots/my.txt"):
        (run / rel).write_text("mine\n")
    assert _run(capsys, _args(tiny_model_dirs, data, run, "run.overwrite=true", "optim.total_steps=1"))[0] == 0
    for rel in ("final/MY_README.md", "checkpoints/mine.txt", "plots/my.txt"):
        assert (run / rel).read_text() == "mine\n", rel
    assert not list((run / "plots").glob("*.png"))  # the old run's plots went
    assert [c.name for c in (run / "checkpoints").glob("step-*")] == ["step-000001"]
    # the end-of-run export keeps a user's file in final/ too
    assert (run / "final" / "model.safetensors").exists()


def test_a_refused_resume_changes_nothing(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run, "optim.total_steps=3"))[0] == 0
    config = (run / "config.yaml").read_text()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Something else?"}) + "\n")
    for override, needle in [("optim.total_steps=2", "below the checkpoint's step 3"),
                             (f"data.train_path={other}", "training prompts"),
                             (f"teacher.path={tiny_model_dirs['qwen2']}", "is not the teacher this run started with")]:
        code, err = _run(capsys, ["train", "--resume", str(run), override])
        assert code == 2 and needle in err, err
        assert (run / "config.yaml").read_text() == config
    assert _run(capsys, ["train", "--resume", str(run), "optim.total_steps=4"])[0] == 0  # still resumable
    code, err = _run(capsys, ["train", "--resume", str(run), "run.out_dir=/elsewhere"])
    assert code == 2 and "run.out_dir does not apply to a resumed run" in err


def test_the_same_fallback_twice(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run, "optim.total_steps=3", "run.save_every=1",
                              "run.keep_last=3"))[0] == 0
    for _ in range(2):
        assert _run(capsys, ["train", "--resume", str(run), "--checkpoint", "2"])[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        ".abandoned-step-000003", ".abandoned-step-000003-1", "step-000001", "step-000002", "step-000003"]


def test_paths_are_stored_absolute_and_tilde_is_expanded(tmp_path, tiny_model_dirs, data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    shutil.copy(data, tmp_path / "rel.jsonl")
    args = [a for a in _args(tiny_model_dirs, data, "x") if not a.startswith(("data.train_path", "run.out_dir"))]
    assert _run(capsys, [*args, "data.train_path=rel.jsonl", "run.out_dir=~/runs/a", "optim.total_steps=1"])[0] == 0
    run = tmp_path / "home" / "runs" / "a"
    assert (run / "final").is_dir() and not (tmp_path / "~").exists()
    assert f"train_path: {tmp_path / 'rel.jsonl'}" in (run / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path / "home")  # resumes from another working directory
    assert _run(capsys, ["train", "--resume", str(run), "optim.total_steps=2"])[0] == 0


def test_more_bad_inputs_without_tracebacks(tmp_path, tiny_model_dirs, data, capsys):
    bad_template = tmp_path / "bad.jinja"
    bad_template.write_text("{% for m in messages %}{{ m['content'] }")
    code, err = _run(capsys, _args(tiny_model_dirs, data, tmp_path / "a", f"model.chat_template={bad_template}"))
    assert code == 2 and f"'{bad_template}' line 1: not a valid Jinja template" in err
    system_only = tmp_path / "sys.jsonl"
    system_only.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be brief."}]}) + "\n")
    code, err = _run(capsys, _args(tiny_model_dirs, system_only, tmp_path / "b"))
    assert code == 2 and f"{system_only} line 1: field 'prompt' has only system messages" in err
    code, err = _run(capsys, _args(tiny_model_dirs, data, tmp_path / ("x" * 300)))
    assert code == 2 and "longer than 255 bytes" in err
    code, err = _run(capsys, ["check", "--student", str(tiny_model_dirs["qwen2"]), "--teacher",
                              str(tiny_model_dirs["llama"]), "--device", "meta"])
    assert code == 2 and "'meta' is not supported" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1.0e-5  # mine\n")
    code, err = _run(capsys, ["config", str(cfg), "--out", str(cfg)])
    assert code == 2 and "is the input config" in err and "# mine" in cfg.read_text()
    for argv, needle in [(["demo", "--steps", "5"], "--steps goes with --toy"),
                         (["demo", "--toy", "--out", str(tmp_path / "t")], "--toy runs in memory"),
                         (["demo", "optim.lr=abc", "--out", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c")],
                          "optim.lr: expected float")]:
        code, err = _run(capsys, argv)
        assert code == 2 and needle in err, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()  # refused before any work


def test_plot_reads_a_live_runs_metrics(tmp_path, tiny_model_dirs, data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, _args(tiny_model_dirs, data, run))[0] == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"note": "no step"}\n{"step": 3, "loss": 0.1')  # a line without a step, a half-written one
    assert main(["plot", str(run / "metrics.jsonl")]) == 0
    assert (run / "plots" / "loss.png").exists()
