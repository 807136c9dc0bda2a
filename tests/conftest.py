"""Shared test settings: a fast, deterministic hypothesis profile."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "opdkit",
    max_examples=int(os.environ.get("OPDKIT_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("opdkit")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (~400 tokens) with a ChatML template, trained in the test session."""
    from opdkit.tiny import train_tokenizer
    from tests.tiny_models import corpus

    return train_tokenizer(corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """Saved model directories: ``{"qwen2": path, "llama": path}`` (random weights, real classes)."""
    from opdkit.tiny import build_tiny_model, save_model_dir

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        arch: save_model_dir(build_tiny_model(tiny_tokenizer, arch=arch, seed=i), tiny_tokenizer, root / arch)
        for i, arch in enumerate(("qwen2", "llama"))
    }
