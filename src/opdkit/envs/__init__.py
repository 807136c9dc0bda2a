"""Multi-turn environments: the protocol (:mod:`opdkit.envs.base`), TextWorld (:mod:`opdkit.envs.textworld`),
ALFWorld (:mod:`opdkit.envs.alfworld`), worker processes with time limits (:mod:`opdkit.envs.pool`), episodes
through the sampler (:mod:`opdkit.envs.episodes`), data lines and sources (:mod:`opdkit.envs.data`) and
evaluation (:mod:`opdkit.envs.evaluate`). Importing this package imports only the protocol."""

from opdkit.envs.base import (
           ENV_KINDS,
           EnvError,
           Environment,
           EnvSpec,
           PromptTemplate,
           StepResult,
           make_env,
           register_env,
)

__all__ = ["ENV_KINDS", "EnvError", "EnvSpec", "Environment", "PromptTemplate", "StepResult", "make_env",
           "register_env"]
