"""The demo's tokenizer, teacher and weaker student: loading them, and every public name of the demo models.

The work is split by job, and every public name is importable from here:

- :mod:`opdkit.demo.settings`: :class:`ModelSpec`, :class:`DemoSettings` (every number of the build);
- :mod:`opdkit.demo.cache`: :func:`prepare_demo_models` (the cache entry, built atomically, verified on
  every load) and :class:`DemoModels`;
- :mod:`opdkit.demo.build`: what is built, the tokenizer and the fine-tuning of the teacher and student;
- :mod:`opdkit.demo.sampling`: :func:`generate_responses` and :func:`evaluate_accuracy`, which sample with
  the library's :class:`opdkit.rollout.HFSampler`;
- this module: :func:`load_demo_model` and :func:`load_demo_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from opdkit.demo.cache import (
    CACHE_FORMAT,
    DemoModels,
    cache_key,
    default_cache_dir,
    prepare_demo_models,
    verify_cache_entry,
)
from opdkit.demo.sampling import Responses, evaluate_accuracy, generate_responses
from opdkit.demo.settings import DemoSettings, ModelSpec
from opdkit.errors import OpdkitError

__all__ = [
    "CACHE_FORMAT",
    "ModelSpec",
    "DemoSettings",
    "DemoModels",
    "Responses",
    "prepare_demo_models",
    "default_cache_dir",
    "cache_key",
    "verify_cache_entry",
    "load_demo_model",
    "load_demo_tokenizer",
    "generate_responses",
    "evaluate_accuracy",
]


def load_demo_model(path: str | Path, *, device=None):
    """A demo model directory as a causal LM in eval mode (safetensors only: a pickle file is refused)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = Path(path)
    if not (p / "model.safetensors").is_file():
        raise OpdkitError(f"demo model '{p}': no model.safetensors (opdkit loads demo weights from safetensors only)")
    model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_demo_tokenizer(path: str | Path):
    """The demo tokenizer saved in ``path`` (a model directory or the entry's ``tokenizer`` directory)."""
    from opdkit.hf import load_tokenizer

    return load_tokenizer(path, require_chat_template=True)
