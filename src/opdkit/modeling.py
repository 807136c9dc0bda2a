"""The one module that knows Hugging Face model internals.

Everything else in opdkit reaches a causal LM through these functions: the transformer body's final
hidden states (with position ids that ignore left padding), the output head with the model's own output
transforms, the number of output rows, and a probe that proves the two reproduce ``model(...).logits``.

Shapes: ``B`` sequences, ``L`` prompt + response columns, ``P`` padded prompt length, ``T`` response
positions (``L = P + T``), ``N`` flattened positions, ``H`` hidden size, ``V`` output rows.

Output transforms. Several architectures change the logits after the LM head, and a trainer that skips
them trains a different model from the one that samples (a tiny Gemma-2 differs by up to 5.9 nats):

=====================  ==============================================  =========================
architecture           transform                                       config / module field
=====================  ==============================================  =========================
Gemma 2, 3, 3n, 4      ``c · tanh(z / c)``                             ``final_logit_softcapping``
Cohere 1, 2            ``z · s``                                       ``logit_scale``
Granite                ``z / s``                                       ``logits_scaling``
Falcon-H1              ``z · s``                                       ``model.lm_head_multiplier``
=====================  ==============================================  =========================

An architecture with a transform not listed here is caught by :func:`verify_output_head`, which the
trainer and the local teacher run once at start-up on a short probe: it refuses a model whose logits
opdkit cannot reproduce instead of training it silently wrong.

The fused support KL (``opdkit.losses.support_kl_from_hidden``) gathers K rows of the head's weight; it
can express a plain bias-free ``nn.Linear`` head with a multiplicative scale (folded into the
temperature). A soft-capped head, a head with a bias, or a head wrapped by an adapter (LoRA on
``lm_head``) cannot be expressed that way: :attr:`OutputHead.fused_weight` is then ``None`` and
:attr:`OutputHead.unfused_reason` says why, and the objectives fall back to chunked dense logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdkit.errors import OpdkitError

__all__ = [
    "context_length",
    "ModelingError",
    "OutputHead",
    "causal_lm",
    "hidden_states",
    "output_head",
    "position_ids_from_mask",
    "response_hidden",
    "verify_output_head",
    "vocab_rows",
]


class ModelingError(OpdkitError, ValueError):
    """A model is not a causal LM opdkit can drive, or its logits cannot be reproduced."""


def position_ids_from_mask(attention_mask_B_L: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens: left padding does not shift positions."""
    return (attention_mask_B_L.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm(model):
    """The ``*ForCausalLM`` inside ``model`` (a peft model's base model, adapters injected); wrappers such as
    DDP must be removed by the caller (``accelerator.unwrap_model``)."""
    if hasattr(model, "get_base_model"):  # peft: the causal LM with the adapter layers injected
        model = model.get_base_model()
    if not callable(getattr(model, "get_output_embeddings", None)):
        raise ModelingError(f"{type(model).__name__}: expected a Hugging Face causal LM (*ForCausalLM)")
    return model


def _body(model):
    lm = causal_lm(model)
    body = getattr(lm, "base_model", None)
    if body is None or body is lm:
        raise ModelingError(f"{type(lm).__name__}: expected a causal LM with a separate transformer body")
    return body


def hidden_states(model, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor) -> torch.Tensor:
    """``[B, L, H]`` final hidden states (after the last norm) of the transformer body, no KV cache."""
    out = _body(model)(
        input_ids=input_ids_B_L,
        attention_mask=attention_mask_B_L,
        position_ids=position_ids_from_mask(attention_mask_B_L),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def response_hidden(
    model, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """``[B, T, H]`` hidden states that predict each response token: columns ``P-1 .. L-2``."""
    return hidden_states(model, input_ids_B_L, attention_mask_B_L)[:, prompt_len - 1 : -1]


@dataclass(frozen=True)
class OutputHead:
    """The LM head and the model's output transforms: ``logits = softcap(scale · head(hidden))``.

    Attributes:
        module: the head (``nn.Linear``, or an adapter layer wrapping one).
        scale: multiplier on the head's output (1.0 for most models).
        softcap: ``c`` of ``c · tanh(z / c)``, or ``None``.
        architecture: the model class name, for messages.
    """

    module: torch.nn.Module
    scale: float = 1.0
    softcap: float | None = None
    architecture: str = ""

    @property
    def rows(self) -> int:
        """Output rows ``V`` (the vocabulary as the model sees it, padding rows included)."""
        return int(self.weight.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """``[V, H]`` weight of the (base) head layer."""
        w = getattr(self.module, "weight", None)
        if w is None:
            base = getattr(self.module, "base_layer", None)
            w = getattr(base, "weight", None)
        if w is None:
            raise ModelingError(f"{self.architecture}: its LM head has no weight")
        return w

    @property
    def unfused_reason(self) -> str | None:
        """Why the fused support KL cannot express this head exactly (``None``: it can)."""
        if type(self.module) is not torch.nn.Linear:
            return f"the LM head is a {type(self.module).__name__} (e.g. LoRA on lm_head), not a plain Linear layer"
        if self.module.bias is not None:
            return "the LM head has a bias"
        if self.softcap is not None:
            return f"{self.architecture} soft-caps its logits (final_logit_softcapping = {self.softcap:g})"
        return None

    @property
    def fused_weight(self) -> torch.Tensor | None:
        """The ``[V, H]`` weight when ``logits = scale · hidden @ weight.T`` exactly, else ``None``."""
        return None if self.unfused_reason is not None else self.module.weight

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's output transforms applied to head outputs (any shape), in float32 or wider."""
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits exactly as ``model(...).logits`` computes them (float32 or wider)."""
        return self.transform(self.module(hidden_N_H))


def _config_value(config, name: str):
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def context_length(model) -> int | None:
    """The model's ``max_position_embeddings`` (its text config's for a multimodal one), or None."""
    return _config_value(causal_lm(model).config, "max_position_embeddings")


def output_head(model) -> OutputHead:
    """The :class:`OutputHead` of a causal LM (peft models included), transforms read from its config."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ModelingError(f"{type(lm).__name__}: has no LM head (get_output_embeddings() is None)")
    config = getattr(lm, "config", None)
    scale = 1.0
    logit_scale = _config_value(config, "logit_scale")  # Cohere
    if logit_scale is not None:
        scale *= float(logit_scale)
    logits_scaling = _config_value(config, "logits_scaling")  # Granite
    if logits_scaling is not None:
        scale /= float(logits_scaling)
    multiplier = getattr(getattr(lm, "model", None), "lm_head_multiplier", None)  # Falcon-H1
    if multiplier is not None:
        scale *= float(multiplier)
    softcap = _config_value(config, "final_logit_softcapping")  # Gemma 2 and later
    return OutputHead(
        module=head, scale=scale, softcap=None if softcap is None else float(softcap), architecture=type(lm).__name__
    )


def vocab_rows(model_or_config) -> int | None:
    """Output rows of a model (its LM head), or ``vocab_size`` of a config."""
    get_out = getattr(model_or_config, "get_output_embeddings", None)
    if get_out is not None:
        out = get_out()
        w = getattr(out, "weight", None)
        if w is not None:
            return int(w.shape[0])
        model_or_config = model_or_config.config
    cfg = model_or_config
    if getattr(cfg, "vocab_size", None) is None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    vs = getattr(cfg, "vocab_size", None)
    return int(vs) if vs is not None else None


@torch.no_grad()
def verify_output_head(model, *, length: int = 8, atol: float | None = None) -> float:
    """Check that :func:`response_hidden` + :class:`OutputHead` reproduce ``model(...).logits``.

    Runs the model once on ``length`` fixed token ids and compares the logits. Returns the largest
    absolute difference; raises :class:`ModelingError` above ``atol`` (default: 1e-3 in float32 and wider,
    0.1 for half-precision weights, whose head output is rounded before the transforms).
    """
    head = output_head(model)
    V = head.rows
    device = head.weight.device
    ids = (torch.arange(1, length + 1, device=device) * 7919) % max(V - 1, 1)
    ids = ids.unsqueeze(0)
    att = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
        ours = head.logits(hidden_states(model, ids, att)).float()
    finally:
        model.train(was_training)
    diff = float((reference - ours).abs().max())
    if atol is None:
        atol = 1e-3 if head.weight.dtype in (torch.float32, torch.float64) else 0.1
    if not diff <= atol:
        raise ModelingError(
            f"{head.architecture}: opdkit cannot reproduce this model's output logits (largest difference "
            f"{diff:.3g} > {atol:g}); it applies an output transform opdkit does not know. Supported transforms: "
            "final_logit_softcapping, logit_scale, logits_scaling, lm_head_multiplier (see opdkit/modeling.py)"
        )
    return diff
