"""One typed configuration tree (``schema``: every field, documented once) and its loader (``loader``:
YAML files, ``a.b=value`` overrides, validation with file:line errors). Import from here."""

from opdkit.config.loader import (
    FIELD_KEYS,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    explain_config,
    field_doc,
    load_config,
    save_config,
    validate_config,
)
from opdkit.config.schema import (
    Config,
    DataConfig,
    EnvConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TeacherConfig,
)

__all__ = [
    "FIELD_KEYS",
    "Config",
    "DataConfig",
    "EnvConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RolloutConfig",
    "RunConfig",
    "TeacherConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "explain_config",
    "field_doc",
    "load_config",
    "save_config",
    "validate_config",
]
