"""Multi-turn episodes through the sampler seam: the student plays environments turn by turn, and each
episode becomes one token sequence of a :class:`~opdkit.types.RolloutBatch`.

An episode is a chat conversation. Its prompt is the task's system message and the first observation as a
user message (the chat template with a generation prompt). At each turn every live episode's conversation so
far, as token ids, is continued by ``sampler.sample_tokens`` (all live episodes in one batch, at most
``max_turn_tokens`` each); the reply, decoded, is the action (a game plays its first line after any
``</think>``: :func:`opdkit.envs.base.command_of`), played in the environment (all episodes at once, in the
:class:`~opdkit.envs.pool.EnvPool`'s worker processes). Unless the episode is over, the tokens the chat
template puts between the student's turn and its next one (the end of the assistant turn, the observation as
a user turn, the next generation prompt) are appended, and the next turn goes on from exactly the tokens the
student produced (never re-tokenized text: the log-probs of the sequence are the ones it was sampled with).

The batch: ``prompt_len`` columns of left-padded prompts, then the rest of each episode (right-padded).
``response_mask_B_T`` is 1 only on the student's own tokens (every turn's, its end-of-turn token included);
observations and template tokens are context (attention 1, loss mask 0, ``sampled_ids`` pad). ``turn_bounds``
holds each turn's ``(start, end)`` response columns. ``finish_reason`` is ``stop`` when the environment ended
the episode (won, lost, or failed) and ``length`` when the turn limit or the token budget did (also when the
game's own step limit, set to the turn limit, ends an episode that was not won on its last turn). The teacher
scores the same sequence.

A turn's seed is ``trajectory_seed(episode seed, turn)``, so an episode is the same however the batch is cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from opdkit.data.chat import left_pad, render_chat, render_chat_text
from opdkit.envs.base import EnvSpec, PromptTemplate
from opdkit.errors import InputError
from opdkit.rollout.seeding import trajectory_seed
from opdkit.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch

__all__ = ["EpisodeResult", "EpisodeSettings", "action_text", "episode_metrics", "first_messages",
           "fit_episode_budget", "run_episodes", "turn_suffix"]

_SENTINEL = "\x00opdkit-turn\x00"


@dataclass(frozen=True)
class EpisodeSettings:
    """``max_turns``: actions per episode; ``max_turn_tokens``: tokens per student turn; ``max_tokens``: the
    whole episode's budget (prompt included; an episode that would pass it ends, ``length``)."""

    max_turns: int = 10
    max_turn_tokens: int = 64
    max_tokens: int = 4096

    @classmethod
    def from_config(cls, env_cfg) -> EpisodeSettings:
        """From the ``env`` config section."""
        return cls(env_cfg.max_turns, env_cfg.max_turn_tokens, env_cfg.max_episode_tokens)


@dataclass(frozen=True)
class EpisodeResult:
    """How one episode went: ``won``; ``turns`` played; the summed ``reward``; ``failure`` (the environment
    raised or overran: its reason) or None; the ``actions`` played and the ``observations`` seen (the first
    included)."""

    task: str | None
    won: bool
    turns: int
    reward: float
    failure: str | None
    actions: tuple[str, ...] = ()
    observations: tuple[str, ...] = ()
    finish: str = FINISH_LENGTH
    tokens: int = 0  # the student's own tokens over all turns
    prompt: str = ""  # the first prompt as the student saw it (the chat template's text)


def action_text(text: str) -> str:
    """What is sent to the environment for a reply: its text, stripped (the environment takes its command from
    it: :func:`opdkit.envs.base.command_of` for games; a single-turn problem grades all of it)."""
    return text.strip()


def turn_suffix(tokenizer, observation: str, *, system: str | None, after_eos: str | None) -> list[int]:
    """The token ids the chat template puts after an assistant turn's content and before the next assistant
    turn's content, with ``observation`` as the user turn in between. ``after_eos``: the text of the
    end-of-turn token the student already produced (then not repeated), or None if its turn was cut short."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
        {"role": "user", "content": observation}]
    text = render_chat_text(tokenizer, msgs, add_generation_prompt=True)
    at = text.find(_SENTINEL)
    if at < 0:
        raise InputError("the chat template dropped an assistant message's content; multi-turn episodes need a "
                         "template that renders earlier assistant turns")
    suffix = text[at + len(_SENTINEL):]
    if after_eos and suffix.startswith(after_eos):
        suffix = suffix[len(after_eos):]
    return [int(t) for t in tokenizer(suffix, add_special_tokens=False)["input_ids"]]


@dataclass
class _Ep:
    spec: EnvSpec
    seed: int
    prompt: list[int]
    resp: list[int] = field(default_factory=list)
    student: list[int] = field(default_factory=list)
    old_lp: list[float] = field(default_factory=list)
    samp_lp: list[float] = field(default_factory=list)
    ent: list[float] = field(default_factory=list)
    lse: list[float] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    won: bool = False
    failure: str | None = None
    finish: str = FINISH_LENGTH

    def extend(self, ids, student: bool, old=None, samp=None, ent=None, lse=None) -> None:
        n = len(ids)
        self.resp.extend(int(t) for t in ids)
        self.student.extend([1 if student else 0] * n)
        for dst, src in ((self.old_lp, old), (self.samp_lp, samp), (self.ent, ent), (self.lse, lse)):
            dst.extend([0.0] * n if src is None else [float(x) for x in src])


def fit_episode_budget(env_cfg, context: int | None, *, key: str, log):
    """The ``env`` config section ``env_cfg`` with ``max_episode_tokens`` at most the model's ``context`` (a log
    line when it is lowered): an episode longer than the model's positions would be played on positions it
    never saw."""
    if context is None or env_cfg.max_episode_tokens <= context:
        return env_cfg
    log(f"note: {key} {env_cfg.max_episode_tokens} is more than the model's context ({context} positions, "
        f"max_position_embeddings): episodes end at {context} tokens")
    return dataclasses.replace(env_cfg, max_episode_tokens=int(context))


def first_messages(template: PromptTemplate, observation: str, info: dict) -> list[dict]:
    """An episode's prompt messages: the template's system message, then the first observation as the user."""
    msgs = [{"role": "system", "content": template.system}] if template.system else []
    return msgs + [{"role": "user", "content": template.render(observation, info, first=True)}]


def run_episodes(sampler, pool, specs: Sequence[EnvSpec], seeds: Sequence[int], *, template: PromptTemplate,
                 settings: EpisodeSettings, prompt_index: Sequence[int] | None = None
                 ) -> tuple[RolloutBatch, list[EpisodeResult]]:
    """Play one episode per spec with the student behind ``sampler`` (see the module docstring); the
    episodes as a :class:`RolloutBatch` (row ``i`` = ``specs[i]``) and how each went."""
    if len(specs) != len(seeds) or not specs:
        raise InputError(f"specs and seeds: expected as many of each, at least one (got {len(specs)} and "
                         f"{len(seeds)})")
    tok = sampler.tokenizer
    pad = int(getattr(sampler, "pad_id", None) if getattr(sampler, "pad_id", None) is not None
              else tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    eos = tuple(getattr(sampler, "eos_ids", ()) or (tok.eos_token_id,))
    eos_text = {i: tok.decode([i], skip_special_tokens=False) for i in eos if i is not None}
    first = pool.reset(list(specs))
    eps: list[_Ep] = []
    for spec, seed, res in zip(specs, seeds, first, strict=True):
        obs = "" if res.done else res.observation
        # an environment that failed to start has no observation to fill the template with: a bare prompt
        first = (first_messages(template, obs, res.info) if not res.done else
                 [{"role": "user", "content": "(the environment failed to start)"}])
        ep = _Ep(spec, int(seed), render_chat(tok, first))
        ep.observations.append(obs)
        if res.done:  # the environment failed to start: an episode with no turn
            ep.done, ep.failure, ep.finish = True, res.info.get("failure", "error"), FINISH_STOP
        eps.append(ep)
    have_stats = True
    for ep in eps:  # a first observation that leaves no room for a turn: a failure of the setting, recorded
        if not ep.done and len(ep.prompt) + settings.max_turn_tokens > settings.max_tokens:
            ep.done, ep.failure = True, (f"budget: the first prompt ({len(ep.prompt)} tokens) leaves no room for a "
                                         f"turn of {settings.max_turn_tokens} within {settings.max_tokens} tokens")
    for turn in range(settings.max_turns):
        live = [b for b, ep in enumerate(eps) if not ep.done]
        if not live:
            break
        out = sampler.sample_tokens(
            [eps[b].prompt + eps[b].resp for b in live], seeds=[trajectory_seed(eps[b].seed, turn) for b in live],
            max_new_tokens=settings.max_turn_tokens, task_ids=[eps[b].spec.task for b in live],
            prompt_index=list(range(len(live))))
        have_stats = have_stats and out.entropy_B_T is not None
        actions, cut = {}, {}
        for i, b in enumerate(live):
            ep, m = eps[b], out.response_mask_B_T[i].bool()
            ids = out.sampled_ids_B_T[i][m].tolist()
            start = len(ep.resp)
            ep.extend(ids, True, out.old_logprobs_B_T[i][m].tolist(), out.sampling_logprobs_B_T[i][m].tolist(),
                      None if out.entropy_B_T is None else out.entropy_B_T[i][m].tolist(),
                      None if out.logsumexp_B_T is None else out.logsumexp_B_T[i][m].tolist())
            ep.turns.append((start, len(ep.resp)))
            text = tok.decode(ids, skip_special_tokens=True)
            actions[b] = action_text(text)
            ep.actions.append(actions[b])
            cut[b] = None if out.finish_reason[i] == FINISH_LENGTH or ids[-1] not in eos_text else eos_text[ids[-1]]
        results = pool.step(actions)
        for b, res in results.items():
            ep = eps[b]
            ep.reward += float(res.reward)
            ep.observations.append(res.observation)
            if res.done:
                ep.done, ep.won, ep.finish = True, bool(res.info.get("won", False)), FINISH_STOP
                ep.failure = res.info.get("failure")
                if not ep.won and ep.failure is None and turn + 1 == settings.max_turns:
                    # the game's own step limit is env.max_turns (env_defaults): out of turns, not over
                    ep.finish = FINISH_LENGTH
                continue
            if turn + 1 == settings.max_turns:
                continue
            suffix = turn_suffix(tok, template.render(res.observation, res.info, first=False),
                                 system=template.system, after_eos=cut[b])
            if len(ep.prompt) + len(ep.resp) + len(suffix) + settings.max_turn_tokens > settings.max_tokens:
                ep.done = True  # out of token budget: ends like the turn limit (finish "length")
                continue
            ep.extend(suffix, False)
    pool.close_episodes()
    batch = _assemble(eps, pad, have_stats, prompt_index)
    results = [EpisodeResult(ep.spec.task, ep.won, len(ep.actions), ep.reward, ep.failure, tuple(ep.actions),
                             tuple(ep.observations), ep.finish, sum(ep.student),
                             tok.decode(ep.prompt, skip_special_tokens=False)) for ep in eps]
    return batch, results


def _assemble(eps: list[_Ep], pad: int, have_stats: bool, prompt_index) -> RolloutBatch:
    prompt_ids, prompt_mask = left_pad([ep.prompt for ep in eps], pad)
    B, T = len(eps), max(1, max(len(ep.resp) for ep in eps))

    def grid(values, fill, dtype):
        t = torch.full((B, T), fill, dtype=dtype)
        for b, v in enumerate(values):
            if v:
                t[b, : len(v)] = torch.tensor(v, dtype=dtype)
        return t

    resp = grid([ep.resp for ep in eps], pad, torch.long)
    real = grid([[1] * len(ep.resp) for ep in eps], 0, torch.long)
    student = grid([ep.student for ep in eps], 0, torch.long)
    sampled = torch.where(student.bool(), resp, torch.full_like(resp, pad))
    index = tuple(prompt_index) if prompt_index is not None else tuple(range(B))
    if len(index) != B:
        raise InputError(f"prompt_index: expected one entry per episode ({B}), got {len(index)}")
    return RolloutBatch(
        input_ids_B_L=torch.cat([prompt_ids, resp], dim=1),
        attention_mask_B_L=torch.cat([prompt_mask, real], dim=1),
        prompt_len=int(prompt_ids.shape[1]),
        response_mask_B_T=student,
        sampled_ids_B_T=sampled,
        old_logprobs_B_T=grid([ep.old_lp for ep in eps], 0.0, torch.float32),
        sampling_logprobs_B_T=grid([ep.samp_lp for ep in eps], 0.0, torch.float32),
        finish_reason=tuple(ep.finish for ep in eps),
        prompt_index=index,
        task_ids=tuple(ep.spec.task for ep in eps),
        turn_bounds=tuple(tuple(ep.turns) for ep in eps),
        entropy_B_T=grid([ep.ent for ep in eps], 0.0, torch.float32) if have_stats else None,
        logsumexp_B_T=grid([ep.lse for ep in eps], 0.0, torch.float32) if have_stats else None,
    )


def episode_metrics(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success rate, mean turns and failure rate of ``results``."""
    n = max(len(results), 1)
    return {"success": sum(r.won for r in results) / n, "turns": sum(r.turns for r in results) / n,
            "env_failures": sum(r.failure is not None for r in results) / n}

