"""The paper's claims, each reproduced or refuted by one command (``opdkit experiment NAME``).

- ``opdkit.experiments.arms``: the experiments and their arms (config overrides of the demo's OPD run).
- ``opdkit.experiments.runner``: running the arms, and the gradient-variance probe.
- ``opdkit.experiments.report``: ``results.csv``, ``results.md`` and the figure.
"""

from opdkit.experiments.arms import EXPERIMENTS, Arm, Experiment, get_experiment

__all__ = ["EXPERIMENTS", "Arm", "Experiment", "get_experiment", "run_experiment"]


def run_experiment(*args, **kwargs):
    """See :func:`opdkit.experiments.runner.run_experiment` (imported on use: it needs torch)."""
    from opdkit.experiments.runner import run_experiment as run

    return run(*args, **kwargs)
