"""Special-token masking: configured strings -> student ids, defaults, errors, and the mask wrapper."""

import pytest
import torch

from opdkit.errors import InputError
from opdkit.special_tokens import (
    apply_special_token_mask,
    default_special_strings,
    render_template,
    resolve_special_ids,
    template_special_tokens,
)


def test_default_is_eos_then_template_specials(tiny_tokenizer):
    tok = tiny_tokenizer
    assert default_special_strings(tok) == ["<|im_end|>", "<|im_start|>"]
    ids = resolve_special_ids(tok, None)
    assert ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")]
    # <|endoftext|> is special but the template does not emit it, and it is not the EOS here
    assert tok.convert_tokens_to_ids("<|endoftext|>") not in ids


def test_template_specials_in_order_of_appearance(tiny_tokenizer):
    assert template_special_tokens(tiny_tokenizer) == ["<|im_start|>", "<|im_end|>"]
    assert render_template(tiny_tokenizer).startswith("<|im_start|>user\n")


def test_no_template_defaults_to_eos_only():
    from opdkit.tiny import train_tokenizer
    from tests.tiny_models import corpus

    tok = train_tokenizer(corpus(100), vocab_size=300, chat_template=None)
    assert render_template(tok) is None
    assert resolve_special_ids(tok, None) == [tok.eos_token_id]


def test_empty_list_means_no_masking(tiny_tokenizer):
    assert resolve_special_ids(tiny_tokenizer, []) == []


def test_each_entry_is_one_token_or_an_id(tiny_tokenizer):
    tok = tiny_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = resolve_special_ids(tok, ["<", "think", "<|im_end|>", im_end, "<"])
    assert ids == [tok.encode("<", add_special_tokens=False)[0], tok.encode("think", add_special_tokens=False)[0],
                   im_end]  # in order, deduplicated (the id and the text of <|im_end|> are one entry)


@pytest.mark.parametrize("entry, pieces", [("<think>", 2), ("<|im_end|", None), ("<nonexistent_tok>", None)])
def test_a_string_of_several_tokens_is_refused_with_its_pieces(tiny_tokenizer, entry, pieces):
    """A typo ('<|im_end|') or a multi-token string would mask its unrelated sub-tokens everywhere."""
    enc = tiny_tokenizer.encode(entry, add_special_tokens=False)
    assert len(enc) > 1 and (pieces is None or len(enc) == pieces)
    with pytest.raises(InputError) as err:
        resolve_special_ids(tiny_tokenizer, ["<|im_end|>", entry])
    msg = str(err.value)
    assert msg.startswith(f"objective.special_tokens: {entry!r} is not one token") and f"{len(enc)} token(s)" in msg
    assert repr(tiny_tokenizer.convert_ids_to_tokens(enc)) in msg


@pytest.mark.parametrize("bad", [[""], ["<|im_end|>", ""]])
def test_empty_string_error_names_it(tiny_tokenizer, bad):
    with pytest.raises(InputError, match="''.*encodes to 0 token"):
        resolve_special_ids(tiny_tokenizer, bad)


def test_bad_types_and_ids(tiny_tokenizer):
    with pytest.raises(InputError, match="expected token strings or ids"):
        resolve_special_ids(tiny_tokenizer, [3.5])
    with pytest.raises(InputError, match="single string"):
        resolve_special_ids(tiny_tokenizer, "<|im_end|>")
    with pytest.raises(InputError, match="id 100000 is outside the student's vocabulary"):
        resolve_special_ids(tiny_tokenizer, [100000])


def test_unknown_token_error():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "</s>": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    assert resolve_special_ids(tok, ["hello"]) == [1]
    with pytest.raises(InputError, match="'zebra' is not one token.*the unknown token"):
        resolve_special_ids(tok, ["zebra"])


@pytest.mark.parametrize("mode,expected", [("first", [1, 0, 1, 0, 1]), ("all", [1, 0, 1, 0, 0])])
def test_apply_special_token_mask(mode, expected):
    sampled = torch.tensor([[5, 7, 9, 8, 7]])
    mask = torch.ones(1, 5, dtype=torch.long)
    out = apply_special_token_mask(mask, sampled, [7, 8], mode)
    assert out.tolist() == [expected]
    assert apply_special_token_mask(mask, sampled, [], mode).tolist() == mask.tolist()
