"""Prompt files, the JSONL reader, the chat renderer, long-prompt filtering (no models)."""

from __future__ import annotations

import pytest

from opdkit.data import DataError, PromptRecord, filter_long_prompts, left_pad, load_prompts, read_jsonl, render_chat


def test_load_prompts_strings_and_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "hi", "answer": 3}\n\n{"prompt": [{"role": "user", "content": "yo"}], "task": "t"}\n')
    recs = load_prompts(p)
    assert recs[0].messages == ({"role": "user", "content": "hi"},) and recs[0].answer == "3"
    assert recs[1].messages[0]["content"] == "yo" and recs[1].answer is None and recs[1].task == "t"
    assert recs[1].source == f"{p} line 3"


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"prompt": "a"}\n{oops}\n', "line 2: not valid JSON"),
        ('["a"]\n', "line 1: expected a JSON object"),
        ('{"question": "a"}\n', "line 1: missing the prompt field 'prompt'"),
        ('{"prompt": 3}\n', "line 1: field 'prompt' must be"),
        ("\n", "no prompts"),
    ],
)
def test_malformed_data_names_file_and_line(tmp_path, text, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=needle) as err:
        load_prompts(p)
    assert str(p) in str(err.value)


def test_missing_or_binary_data_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="not a file"):
        load_prompts(tmp_path)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"prompt": "ok"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(DataError, match=r"line 2: not UTF-8"):
        load_prompts(binary)


def test_read_jsonl_can_skip_a_line_cut_short(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2, "lo')
    assert [row for _, row in read_jsonl(p, skip_bad_lines=True)] == [{"step": 1}]


def test_chat_rendering_and_left_padding(tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    ids = render_chat(tiny_tokenizer, msgs)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    padded, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_long_prompts_are_dropped_with_a_warning(tiny_tokenizer):
    short = PromptRecord(({"role": "user", "content": "What is 1 + 1?"},), source="f line 1")
    long = PromptRecord(({"role": "user", "content": "What is 1 + 1? " * 50},), source="f line 2")
    huge = PromptRecord(({"role": "user", "content": "x" * 3_000_000},), source="f line 3")  # never tokenized
    n_short = len(render_chat(tiny_tokenizer, short.messages))
    said = []
    kept = filter_long_prompts([short, long, huge], tiny_tokenizer, n_short, log=said.append)
    assert kept == [short]
    assert len(said) == 1 and "2 of 3 prompts" in said[0] and "f line 2" in said[0] and "f line 3" in said[0]
    with pytest.raises(DataError, match="every prompt is longer than data.max_prompt_tokens = 3"):
        filter_long_prompts([short], tiny_tokenizer, 3)
