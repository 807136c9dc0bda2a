"""Loading Hugging Face causal LMs and tokenizers from local directories, with clear errors.

Nothing is fetched from a hub (``local_files_only=True``), and modelling code shipped inside a model
directory runs only when the caller asks for it (``trust_remote_code``).
"""

from __future__ import annotations

import json
from pathlib import Path

from opdkit.errors import OpdkitError

__all__ = ["ModelLoadError", "resolve_dtype", "load_tokenizer", "load_causal_lm", "model_dir_digest"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

_DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")


class ModelLoadError(OpdkitError, ValueError):
    """A model or tokenizer directory is missing, unreadable, or not a causal LM."""


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{what} '{path}': no such directory (opdkit loads models from local directories only)")
    if not p.is_dir():
        raise ModelLoadError(f"{what} '{path}': not a directory")
    return p


def resolve_dtype(name: str):
    """``"float32" | "bfloat16" | "float16" | "auto"`` -> a torch dtype (or ``"auto"``)."""
    import torch

    if name not in _DTYPE_NAMES:
        raise ModelLoadError(f"dtype: expected one of {', '.join(_DTYPE_NAMES)}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, require_chat_template: bool = False):
    """``AutoTokenizer`` from a local directory; ``require_chat_template`` fails early if it has none."""
    from transformers import AutoTokenizer

    p = _check_dir(path, "tokenizer")
    if not any((p / f).exists() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"tokenizer '{path}': no tokenizer files in the directory (expected one of "
                             f"{', '.join(_TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here; the path is what the user needs
        raise ModelLoadError(f"tokenizer '{path}': could not be loaded ({type(exc).__name__}: {exc})") from exc
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"tokenizer '{path}': has no chat template, and one is required here (set one in "
            "tokenizer_config.json or chat_template.jinja, or pass raw prompts)"
        )
    return tok


def load_causal_lm(path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False, device=None):
    """``AutoModelForCausalLM`` from a local directory, in eval mode, on ``device`` if given."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # opdkit prints its own progress; per-load bars are noise in logs
    p = _check_dir(path, "model")
    config_file = p / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"model '{path}': no config.json, so this is not a Hugging Face model directory")
    try:
        arch = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model '{path}': config.json is not valid JSON ({exc})") from exc
    if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        raise ModelLoadError(f"model '{path}': architectures {arch} is not a causal LM (expected *ForCausalLM)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=resolve_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(f"model '{path}': could not be loaded as a causal LM ({reason})") from exc
    if device is not None:
        model = model.to(device)
    return model.eval()


def model_dir_digest(path: str | Path) -> str:
    """A digest that tells model directories apart cheaply: ``config.json``, the tokenizer files, and the
    size and first 4 MiB of every weight file (a safetensors header lists every tensor's name, shape and
    offset, and the first tensors follow it)."""
    import hashlib

    p = Path(path).expanduser()
    h = hashlib.sha256()
    for name in ("config.json", *_TOKENIZER_FILES, "chat_template.jinja"):
        f = p / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(p.glob("*.safetensors")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 22))
    return h.hexdigest()
