"""One training step, in its fixed order: rollout -> student pass -> teacher -> objective -> update.

Shapes: ``B`` responses of this process, ``T`` response positions, ``K`` support slots.

Which process does what. The step's ``G = optim.prompts_per_step x rollout.n_samples`` responses are
numbered ``g = prompt x n_samples + sample``; a permutation seeded by ``(run.seed, step)`` cuts them into
``optim.mini_batches`` mini-batches, and each mini-batch's responses are dealt to the processes in turn.
Every response has its own sampling seed, a function of ``(rollout.seed, step, prompt's data position,
sample index)``. So the step's responses, their mini-batches and every gradient are the same for any
number of processes: only which process computes what changes.

Lockstep. Every process runs the same number of forward passes in each phase (micro-batches are cut
into as many parts as the busiest process needs; a process with fewer rows runs a zero-weight pass on
one of its rows): FSDP gathers parameters collectively inside each forward, so the processes must call
it together.

Normalisation: ``aggregate(per_token, loss_mask, objective.aggregation)`` with the count of the whole
mini-batch summed over processes as the denominator, so the gradient does not depend on how a
mini-batch is cut into micro-batches or processes. DDP averages gradients over processes, so each process
divides by ``global_count / world``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from opdkit.losses import (
    NUCLEUS_MASS_TOL,
    aggregate,
    masked_mean,
    nucleus_support,
    opd_diagnostics,
    special_token_mask,
    support_mass,
    topp_correction_weights,
)
from opdkit.objectives import LossInputs
from opdkit.rollout.seeding import trajectory_seed
from opdkit.student import student_pass
from opdkit.train.metrics import StepMetrics
from opdkit.types import FINISH_LENGTH, RolloutBatch, StudentPass, TeacherSignal

__all__ = ["StepPlan", "StepRecord", "plan_step", "run_step", "turn_special_mask"]


@dataclass(frozen=True)
class StepPlan:
    """This process's share of a step.

    Attributes:
        rows: per local response, ``(global response index g, prompt position in the step, seed)``, ordered
            by mini-batch.
        minis: per mini-batch, the ``(start, stop)`` range of ``rows`` it covers on this process.
        busiest: per mini-batch, the most rows any process holds of it (sets the number of micro-batches).
    """

    rows: tuple[tuple[int, int, int], ...]
    minis: tuple[tuple[int, int], ...]
    busiest: tuple[int, ...]


@dataclass(frozen=True)
class StepRecord:
    """What a step computed, for callbacks and tests: the local rollout, student pass, teacher signal and
    loss mask (tensors on this process)."""

    batch: RolloutBatch
    student: StudentPass
    signal: TeacherSignal
    loss_mask_B_T: torch.Tensor
    episodes: list | None = None  # multi-turn steps: how each row's episode went (opdkit.envs.episodes)


def plan_step(step: int, positions: list[int], *, n_samples: int, mini_batches: int, run_seed: int,
              rollout_seed: int, rank: int, world: int) -> StepPlan:
    """Deal the step's responses to this process (see the module docstring).

    ``positions``: the data position (a counter over the run's prompt draws) of each of the step's prompts.
    """
    G = len(positions) * n_samples
    g = torch.Generator().manual_seed(run_seed * 7919 + step)
    order = torch.randperm(G, generator=g)
    rows, minis, busiest = [], [], []
    for mini in order.tensor_split(min(mini_batches, G)):
        start = len(rows)
        for gi in mini.tolist()[rank::world]:
            p, s = divmod(gi, n_samples)
            rows.append((gi, p, trajectory_seed(rollout_seed, step, positions[p], s)))
        minis.append((start, len(rows)))
        busiest.append(-(-len(mini) // world))
    return StepPlan(tuple(rows), tuple(minis), tuple(busiest))


def parts(start: int, stop: int, n_parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into ``n_parts`` nearly equal consecutive ranges (empty ones at the end when
    there are fewer rows than parts)."""
    n = stop - start
    q, r = divmod(n, n_parts)
    out, a = [], start
    for i in range(n_parts):
        b = a + q + (1 if i < r else 0)
        out.append((a, b))
        a = b
    return out


def _cat_pass(parts: list[StudentPass]) -> StudentPass:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return StudentPass(*(cat(f) for f in ("old_logprobs_B_T", "entropy_B_T", "logsumexp_B_T", "topk_ids_B_T_K",
                                          "topk_logprobs_B_T_K")))


def _loss_fn(objective, x: LossInputs, input_ids, attention_mask, prompt_len: int, ppo: bool):
    """The objective's per-token loss; runs inside the prepared module's forward."""
    from opdkit.modeling import output_head, response_hidden

    def fn(lm):
        hidden = response_hidden(lm, input_ids, attention_mask, prompt_len)
        return objective.per_token(output_head(lm), hidden, x, ppo=ppo)

    return fn


def run_step(c, step: int, records: list, positions: list[int], *, keep_record: bool = False):
    """Run one training step on this process; returns ``(StepMetrics, StepRecord | None)``."""
    cfg, dist = c.cfg, c.dist
    o, opt = cfg.objective, cfg.optim
    metrics = StepMetrics()
    plan = plan_step(step, positions, n_samples=cfg.rollout.n_samples, mini_batches=opt.mini_batches,
                     run_seed=cfg.run.seed, rollout_seed=cfg.rollout.seed, rank=dist.rank, world=dist.world)
    G = len(positions) * cfg.rollout.n_samples
    mb = opt.micro_batch_size

    # 1. rollout: prompts, or multi-turn episodes (a step's records are one kind: opdkit.train.tasks)
    t0 = time.perf_counter()
    c.module.eval()
    local_prompts = [records[p] for _, p, _ in plan.rows]
    episodes = None
    if local_prompts and local_prompts[0].env is not None:
        from opdkit.envs.episodes import episode_metrics, run_episodes

        batch, episodes = run_episodes(
            c.sampler, c.env_pool, [r.env for r in local_prompts], [s for _, _, s in plan.rows],
            template=c.env_template, settings=c.episode_settings, prompt_index=[p for _, p, _ in plan.rows])
    else:
        batch = c.sampler.sample(
            [list(r.messages) for r in local_prompts], n_samples=1, seeds=[s for _, _, s in plan.rows],
            prompt_index=[p for _, p, _ in plan.rows], task_ids=[r.task for r in local_prompts],
        )
    metrics.max("time_rollout_s", time.perf_counter() - t0)
    loss_mask = turn_special_mask(batch, c.special_ids, o.special_token_mode)
    if episodes is not None:
        em = episode_metrics(episodes)
        metrics.mean("episode_success", em["success"] * len(episodes), len(episodes))
        metrics.mean("episode_turns", em["turns"] * len(episodes), len(episodes))
        metrics.mean("env_failure_rate", em["env_failures"] * len(episodes), len(episodes))
        metrics.notes += [f"{r.failure}" for r in episodes if r.failure is not None][:1]
    B = batch.batch_size

    # 2. student pass (no grad, through the prepared module, under the precision policy), unless the sampler
    # already recorded pi_old, its entropy and log-normaliser in the same (float32) precision
    t1 = time.perf_counter()
    passes = []
    if c.pi_old_from_sampler:
        passes.append(StudentPass(batch.old_logprobs_B_T, batch.entropy_B_T, batch.logsumexp_B_T))
    with torch.no_grad(), c.precision.autocast():
        for a, b in ([] if c.pi_old_from_sampler else parts(0, B, -(-sum(plan.busiest) // mb))):
            r = slice(a, b) if b > a else slice(0, 1)  # an empty part: a pass kept in lockstep, then dropped
            out = c.module(student_pass, batch.input_ids_B_L[r], batch.attention_mask_B_L[r],
                           batch.prompt_len, batch.sampled_ids_B_T[r], batch.response_mask_B_T[r],
                           temperature=cfg.rollout.temperature, topk=c.objective.student_topk,
                           chunk_size=cfg.model.logits_chunk_size)
            if b > a:
                passes.append(out)
    sp = _cat_pass(passes)
    metrics.max("time_student_s", time.perf_counter() - t1)

    # 3. teacher
    t2 = time.perf_counter()
    messages = [list(r.messages) for r in local_prompts] if cfg.teacher.own_chat_template else None
    teacher = c.teachers.get(local_prompts[0].task, c.teacher) if c.teachers and local_prompts else c.teacher
    signal: TeacherSignal = teacher.score(
        batch, student_support_ids_B_T_K=sp.topk_ids_B_T_K if c.objective.student_topk else None, messages=messages
    )
    if c.objective.nucleus is not None:  # objective.support=teacher_topp: cut each position's nucleus
        top_p, min_k = c.objective.nucleus
        _, nucleus_lp = nucleus_support(signal.support_ids_B_T_K, signal.teacher_logprobs_B_T_K, top_p, min_k=min_k)
        signal = dataclasses.replace(signal, teacher_logprobs_B_T_K=nucleus_lp)
        kept_lp = nucleus_lp[loss_mask.bool()]
        sizes = torch.isfinite(kept_lp).sum(-1).float()
        metrics.mean("support_size", float(sizes.sum()), sizes.numel())
        # cut by K_max: the kept ids hold less than top_p (positions widened by min_k reached it before)
        capped = torch.logsumexp(kept_lp.double(), -1).exp() < top_p - NUCLEUS_MASS_TOL
        metrics.mean("support_size_capped_frac", float(capped.sum()), sizes.numel())
    metrics.max("time_teacher_s", time.perf_counter() - t2)
    local_bad = not bool(
        torch.isfinite(signal.sampled_logprobs_B_T).all()
        and not torch.isnan(signal.teacher_logprobs_B_T_K).any()
        and (signal.teacher_logprobs_B_T_K < float("inf")).all()
    )
    finite = dist.sum([float(local_bad)])[0] == 0  # every process skips together

    # 4-5. objective and update
    t3 = time.perf_counter()
    support_lp = None
    if finite:
        support_lp, upd = _update(c, plan, batch, sp, signal, loss_mask, metrics)
    else:
        metrics.mean("loss", float("nan"), 1.0)
        metrics.set("grad_norm", float("nan"))
        upd = {"skipped": 1, "skip_reason": "teacher_nan"}
    for k, v in upd.items():
        metrics.set(k, v)
    metrics.max("time_update_s", time.perf_counter() - t3)

    _diagnostics(c, metrics, batch, sp, signal, loss_mask, support_lp if finite else None, plan.minis[0], finite)
    n_resp = float(batch.response_mask_B_T.sum())
    metrics.mean("response_length", n_resp, B)
    metrics.mean("truncation_rate", sum(r == FINISH_LENGTH for r in batch.finish_reason), B)
    metrics.mean("special_masked_frac", n_resp - float(loss_mask.sum()), n_resp)
    # the student's mass its rollouts can never sample: the top-p / top-k cut and the blocked pad token; near 1 the
    # student hides its probability where no reward reaches (a collapse that no loss term sees)
    resp = batch.response_mask_B_T.bool()
    z = topp_correction_weights(sp.old_logprobs_B_T.double(), batch.sampling_logprobs_B_T.double(), resp)  # Z_t
    metrics.mean("rollout_tail_mass", float((1.0 - z)[resp].sum()), float(resp.sum()))
    if o.kind == "sampled_token" and o.topp_correction != "none":  # how much the weights shrink the loss
        w = topp_correction_weights(sp.old_logprobs_B_T, batch.sampling_logprobs_B_T, loss_mask,
                                    mode=o.topp_correction, clip=o.topp_correction_clip,
                                    sampled_mask=batch.response_mask_B_T)
        metrics.mean("topp_weight", float(w[loss_mask.bool()].sum()), float(loss_mask.sum()))
    metrics.mean("prompt_truncated_frac", sum(r.truncated for r in local_prompts), B)
    metrics.set("rollouts", G)
    metrics.set("lr", float(c.scheduler.get_last_lr()[0]))
    record = StepRecord(batch, sp, signal, loss_mask, episodes) if keep_record else None
    return metrics, record


def turn_special_mask(batch: RolloutBatch, special_ids, mode: str) -> torch.Tensor:
    """The loss mask: the response mask minus the special tokens (``special_token_mask``), applied to each turn
    of a multi-turn episode on its own, so that ``first`` masks the first occurrence in every turn (each turn
    ends with its own end-of-turn token)."""
    resp = batch.response_mask_B_T.bool()
    mask = special_token_mask(batch.sampled_ids_B_T, special_ids, resp, mode=mode)
    if mode != "first" or not any(len(t) > 1 for t in batch.turn_bounds):
        return mask
    for b, turns in enumerate(batch.turn_bounds):
        for a, e in turns:
            if e > a:
                mask[b, a:e] = special_token_mask(batch.sampled_ids_B_T[b, a:e], special_ids, resp[b, a:e], mode=mode)
    return mask


def _diagnostics(c, metrics: StepMetrics, batch, sp: StudentPass, signal, loss_mask, support_lp, first, finite: bool):
    """METHOD.md's diagnostics as local sums and counts (reduced over processes by the caller).

    ``support_lp``: the student's log-probs on the support from the first mini-batch's forward pass (rows
    ``first``), where the weights are still π_old's: the student's support mass is measured there, on a
    random subset of the step's responses (later mini-batches see updated weights).
    """
    n_loss = float(loss_mask.sum())
    resp = batch.response_mask_B_T.bool()
    metrics.mean("entropy", float(masked_mean(sp.entropy_B_T, resp)) * float(resp.sum()), float(resp.sum()))
    if not finite:
        return
    kw = dict(sampled_ids=batch.sampled_ids_B_T, old_logprobs=sp.old_logprobs_B_T,
              teacher_sampled_logprobs=signal.sampled_logprobs_B_T)
    if c.objective.support_diagnostics:
        kw.update(support_ids=signal.support_ids_B_T_K, teacher_support_logprobs=signal.teacher_logprobs_B_T_K)
        if support_lp is not None:
            m = loss_mask[first[0] : first[1]]
            n = float(m.sum())
            metrics.mean("student_support_mass", float(support_mass(support_lp, m)) * n, n)
    diag = opd_diagnostics(loss_mask, **kw)
    for name, value in diag.items():
        if name != "reward_skew":
            metrics.mean(name, float(value) * n_loss, n_loss)
    # the skewness is reduced from its moments, so it is exact over processes
    r = (signal.sampled_logprobs_B_T.double() - sp.old_logprobs_B_T.double())[loss_mask & torch.isfinite(
        signal.sampled_logprobs_B_T)]
    metrics.moments("reward_skew", r.numel(), float(r.sum()), float((r**2).sum()), float((r**3).sum()))


def _update(c, plan: StepPlan, batch, sp: StudentPass, signal, loss_mask, metrics: StepMetrics):
    """One optimizer step per mini-batch; returns the student's support log-probs of the first mini-batch
    (``None`` when the objective has none) and the step's flags."""
    cfg, dist, acc = c.cfg, c.dist, c.accelerator
    o, opt = cfg.objective, cfg.optim
    c.module.train()
    params = [p for p in c.module.parameters() if p.requires_grad]
    max_norm = opt.grad_clip if opt.grad_clip is not None else float("inf")
    ppo = len(plan.minis) > 1
    support_parts: list[torch.Tensor | None] = []
    norms, skipped = [], 0
    for (start, stop), busiest in zip(plan.minis, plan.busiest, strict=True):
        m = loss_mask[start:stop]
        local = float(m.sum()) if o.aggregation == "token-mean" else float((m.sum(-1) > 0).sum())
        denom = max(dist.sum([local])[0], 1.0) / dist.world
        total = 0.0
        micro = parts(start, stop, -(-busiest // opt.micro_batch_size))
        for i, (a, b) in enumerate(micro):
            weight = 1.0 if b > a else 0.0  # an empty part: a zero-weight pass on one row, in lockstep
            a, b = (a, b) if b > a else (start, start + 1)
            x = LossInputs(
                loss_mask_B_T=loss_mask[a:b],
                sampled_ids_B_T=batch.sampled_ids_B_T[a:b],
                old_logprobs_B_T=sp.old_logprobs_B_T[a:b],
                old_logsumexp_B_T=sp.logsumexp_B_T[a:b],
                support_ids_B_T_K=signal.support_ids_B_T_K[a:b],
                teacher_logprobs_B_T_K=signal.teacher_logprobs_B_T_K[a:b],
                teacher_sampled_logprobs_B_T=signal.sampled_logprobs_B_T[a:b],
                sampling_logprobs_B_T=batch.sampling_logprobs_B_T[a:b],
                response_mask_B_T=batch.response_mask_B_T[a:b],
            )
            sync = i == len(micro) - 1
            with acc.no_sync(c.module) if not sync else contextlib.nullcontext():
                with c.precision.autocast():
                    per_token, support_lp = c.module(
                        _loss_fn(c.objective, x, batch.input_ids_B_L[a:b], batch.attention_mask_B_L[a:b],
                                 batch.prompt_len, ppo)
                    )
                loss = aggregate(per_token.float(), x.loss_mask_B_T, o.aggregation, denominator=denom)
                loss = loss * (o.loss_coef * weight)
                acc.backward(loss)
            total += float(loss.detach())
            if weight and start == plan.minis[0][0]:  # the first mini-batch: still π_old's weights
                support_parts.append(None if support_lp is None else support_lp.detach())
        if c.grad_probe is not None:
            c.grad_probe(params)
        norm = float(acc.clip_grad_norm_(params, max_norm))
        if math.isfinite(norm):
            c.optimizer.step()
            c.scheduler.step()
        else:
            skipped += 1
        c.optimizer.zero_grad(set_to_none=True)
        metrics.mean("loss", total, 1.0)
        norms.append(norm)
    flags: dict[str, Any] = {"skipped": 1 if skipped == len(plan.minis) else 0}
    metrics.set("grad_norm", sum(norms) / max(len(norms), 1))
    if skipped:
        flags["skip_reason"] = "nonfinite_grad"
    support = None if not support_parts or support_parts[0] is None else torch.cat(support_parts)
    return support, flags
