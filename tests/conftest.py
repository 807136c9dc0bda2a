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
