"""Multi-turn episodes through the sampler seam: masks, turn bounds, log-probs and the teacher's signal line up
with the student's own tokens, turn by turn (a real tiny model with a ChatML template and a system prompt)."""

from __future__ import annotations

import pytest
import torch

from opdkit.config import RolloutConfig
from opdkit.data.chat import render_chat, render_chat_text
from opdkit.envs.base import EnvSpec, PromptTemplate
from opdkit.envs.episodes import EpisodeSettings, action_text, run_episodes, turn_suffix
from opdkit.envs.pool import EnvPool
from opdkit.rollout.hf_sampler import HFSampler

SYSTEM = "You play a text game. Reply with one command."


def _spec(i: int, **kw) -> EnvSpec:
    args = {"first": f"Room {i}. A key lies here.", "goal": ["take key"], "max_steps": 10,
            "replies": {"look": "A key."}, **kw}
    return EnvSpec("scripted", args, task="toy")


@pytest.fixture(scope="module")
def student(tiny_model_dirs):
    from opdkit.hf import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dirs["qwen2"])
    return load_causal_lm(tiny_model_dirs["qwen2"], dtype="float32").eval(), tok


def _play(student, specs, *, processes=0, max_turns=4, turn_tokens=5, max_tokens=4096, template=None):
    model, tok = student
    sampler = HFSampler(model, tok, RolloutConfig(top_p=1.0, temperature=1.0))
    with EnvPool(processes=processes, timeout_s=30) as pool:
        return run_episodes(sampler, pool, specs, [11 * i + 1 for i in range(len(specs))],
                            template=template or PromptTemplate(system=SYSTEM),
                            settings=EpisodeSettings(max_turns=max_turns, max_turn_tokens=turn_tokens,
                                                     max_tokens=max_tokens))


def _conversation_text(tok, batch, b, result):
    """The episode as the chat template renders it, built independently from the student's turns (tokens
    decoded) and the observations: what the sequence's real tokens must decode to."""
    ids = batch.input_ids_B_L[b, batch.prompt_len:]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": result.observations[0]}]
    text = ""
    for k, (a, e) in enumerate(batch.turn_bounds[b]):
        turn = ids[a:e].tolist()
        if k == len(batch.turn_bounds[b]) - 1:  # the last turn: the open assistant turn after the prompt
            text = render_chat_text(tok, msgs, add_generation_prompt=True) + tok.decode(turn)
            break
        content = tok.decode(turn[:-1] if turn[-1] == tok.eos_token_id else turn)
        msgs += [{"role": "assistant", "content": content}, {"role": "user", "content": result.observations[k + 1]}]
    return text


def test_loss_mask_covers_exactly_the_students_tokens_of_every_turn(student):
    model, tok = student
    batch, results = _play(student, [_spec(i) for i in range(3)], max_turns=4, turn_tokens=5)
    assert all(r.turns == 4 and not r.won for r in results)  # a random student never takes the key
    for b, r in enumerate(results):
        att = batch.attention_mask_B_L[b].bool()
        # every real token of the row decodes to the conversation the template renders
        assert tok.decode(batch.input_ids_B_L[b][att].tolist()) == _conversation_text(tok, batch, b, r)
        # the mask is 1 exactly inside the turn bounds, position by position
        expected = torch.zeros(batch.response_len, dtype=torch.long)
        for a, e in batch.turn_bounds[b]:
            assert 0 < e - a <= 5
            expected[a:e] = 1
        assert torch.equal(batch.response_mask_B_T[b], expected)
        # the sampled ids are the student's tokens there, pad elsewhere
        resp = batch.input_ids_B_L[b, batch.prompt_len:]
        m = expected.bool()
        assert torch.equal(batch.sampled_ids_B_T[b][m], resp[m])
        assert (batch.sampled_ids_B_T[b][~m] == tok.pad_token_id).all()
        # each action played is the text of its turn
        for (a, e), action in zip(batch.turn_bounds[b], r.actions, strict=True):
            assert action == action_text(tok.decode(resp[a:e].tolist(), skip_special_tokens=True))
        assert len(r.observations) == 5  # the first, then one per action
    assert batch.finish_reason == ("length",) * 3


def test_observation_tokens_are_the_templates_and_never_in_the_loss(student):
    _, tok = student
    suffix = turn_suffix(tok, "It is dark.", system=SYSTEM, after_eos="<|im_end|>")
    assert tok.decode(suffix) == "\n<|im_start|>user\nIt is dark.<|im_end|>\n<|im_start|>assistant\n"
    cut = turn_suffix(tok, "It is dark.", system=SYSTEM, after_eos=None)  # a turn cut at its token limit
    assert tok.decode(cut).startswith("<|im_end|>\n<|im_start|>user\n")
    batch, _ = _play(student, [_spec(0)], max_turns=3, turn_tokens=4)
    resp = batch.input_ids_B_L[0, batch.prompt_len:]
    (a0, e0), (a1, _e1) = batch.turn_bounds[0][:2]
    between = resp[e0:a1].tolist()
    assert tok.decode(between).endswith("<|im_start|>user\nNothing happens.<|im_end|>\n<|im_start|>assistant\n")
    assert batch.response_mask_B_T[0, e0:a1].sum() == 0


def test_recorded_logprobs_and_teacher_signal_line_up_with_the_students_tokens(student, tiny_model_dirs):
    """π_old recorded turn by turn equals a teacher-forced pass of the student over the whole episode, and the
    teacher's log-prob of each student token is its own forward pass's, at the same positions."""
    from opdkit.hf import load_causal_lm, load_tokenizer
    from opdkit.teacher.local import LocalTeacher

    model, tok = student
    batch, _ = _play(student, [_spec(i) for i in range(2)], max_turns=3, turn_tokens=6)
    teacher_model = load_causal_lm(tiny_model_dirs["llama"], dtype="float32").eval()
    teacher = LocalTeacher(teacher_model, load_tokenizer(tiny_model_dirs["llama"]), top_k=4, support="teacher_topk")
    signal = teacher.score(batch)
    P = batch.prompt_len
    for b in range(batch.batch_size):
        att = batch.attention_mask_B_L[b].bool()
        ids = batch.input_ids_B_L[b][att][None]  # the row alone, unpadded
        offset = int((~att[:P]).sum())  # left padding before the prompt
        with torch.no_grad():
            s_lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            t_lp = torch.log_softmax(teacher_model(ids).logits[0].double(), -1)
        m = batch.response_mask_B_T[b].bool()
        cols = torch.nonzero(m).flatten()
        pos = cols + P - offset  # the token's index in the unpadded row
        toks = ids[0, pos]
        assert torch.allclose(batch.old_logprobs_B_T[b][m].double(), s_lp[pos - 1, toks], atol=2e-5)
        assert torch.allclose(signal.sampled_logprobs_B_T[b][m].double(), t_lp[pos - 1, toks], atol=2e-5)
        assert (signal.sampled_logprobs_B_T[b][~m] == 0).all()


def test_an_episode_ends_at_done_or_at_the_turn_limit(student):
    specs = [_spec(0, max_steps=2), _spec(1, goal=[]), _spec(2, max_steps=10), _spec(3, max_steps=3)]
    batch, results = _play(student, specs, max_turns=3, turn_tokens=3)
    lost, won, limit, game_limit = results
    assert (lost.turns, lost.won, lost.finish) == (2, False, "stop")  # the game said done after 2 actions
    assert (won.turns, won.won, won.finish, won.reward) == (1, True, "stop", 1.0)  # an empty goal: won at once
    assert (limit.turns, limit.won, limit.finish) == (3, False, "length")
    # the game's own step limit equal to the turn limit (as env.max_turns sets it): out of turns, "length"
    assert (game_limit.turns, game_limit.won, game_limit.finish) == (3, False, "length")
    assert [len(t) for t in batch.turn_bounds] == [2, 1, 3, 3]
    # no observation is appended after the last turn: every row's last real token is the student's
    for b in range(4):
        last = int(batch.attention_mask_B_L[b].nonzero().max()) - batch.prompt_len
        assert batch.response_mask_B_T[b, last] == 1


def test_token_budget_ends_an_episode(student):
    _, tok = student
    prompt = len(render_chat(tok, [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": _spec(0).args["first"]}]))
    batch, results = _play(student, [_spec(0)], max_turns=10, turn_tokens=4, max_tokens=prompt + 30)
    assert 1 <= results[0].turns < 10 and results[0].finish == "length" and results[0].failure is None
    assert int(batch.attention_mask_B_L[0].sum()) <= prompt + 30
    # a first observation with no room for one turn: no turn, the reason recorded
    batch, results = _play(student, [_spec(0), _spec(1)], max_turns=3, turn_tokens=4, max_tokens=prompt + 3)
    assert [r.turns for r in results] == [0, 0] and "budget" in results[0].failure
    assert batch.response_mask_B_T.sum() == 0


def test_episodes_do_not_depend_on_the_batch_or_the_worker_processes(student):
    """An episode's turns are seeded by (episode seed, turn): alone or in a batch, in-process or in workers."""
    model, tok = student
    sampler = HFSampler(model, tok, RolloutConfig(top_p=0.9))
    template, settings = PromptTemplate(system=SYSTEM), EpisodeSettings(3, 5, 4096)
    with EnvPool(0) as p0, EnvPool(2, timeout_s=30) as p2:
        _, together = run_episodes(sampler, p2, [_spec(i) for i in range(3)], [5, 6, 7], template=template,
                                   settings=settings)
        _, alone = run_episodes(sampler, p0, [_spec(2)], [7], template=template, settings=settings)
    assert together[2].actions == alone[0].actions


def test_the_command_of_a_reply():
    from opdkit.envs.base import command_of

    assert command_of("  open door \nand more") == "open door"
    assert command_of("<think>hmm\nmaybe</think>\ngo north") == "go north"
    assert command_of("") == "" and action_text("  all of it \n") == "all of it"


def test_turn_special_mask_masks_the_first_end_of_turn_of_every_turn(student):
    from opdkit.special_tokens import resolve_special_ids
    from opdkit.train.step import turn_special_mask

    _, tok = student
    batch, _ = _play(student, [_spec(i) for i in range(4)], max_turns=3, turn_tokens=8)
    special = resolve_special_ids(tok, None)
    mask = turn_special_mask(batch, special, "first")
    for b, turns in enumerate(batch.turn_bounds):
        for a, e in turns:
            ids = batch.sampled_ids_B_T[b, a:e].tolist()
            for j, t in enumerate(ids):
                first_in_turn = t in special and t not in ids[:j]
                assert bool(mask[b, a + j]) == (not first_in_turn)
