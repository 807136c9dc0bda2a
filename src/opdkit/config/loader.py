"""Loading the configuration tree: YAML files plus dotted overrides, validated on load.

The fields themselves are declared in ``opdkit.config.schema`` (type, default, documentation, allowed
range or choices in ``dataclasses.field`` metadata). Everything here is driven by that metadata: loading,
type checks, range checks and error messages, so a new field is one line there and cannot be validated
differently from its neighbours.

    cfg = load_config("configs/demo.yaml", ["rollout.top_p=0.95", "model.path=null"])
    save_config(cfg, run_dir / "config.yaml")   # load_config of that file gives back cfg exactly

Every error is a ``ConfigError`` naming the full dotted key and where the value came from (file and line,
or the override string). The configs are frozen: derive a new one with ``apply_overrides``, which
validates again. Only the standard library and PyYAML are imported, so a config can be checked before
torch is loaded.
"""

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from opdkit.config.schema import Config
from opdkit.errors import ConfigError

__all__ = [
    "FIELD_KEYS",
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


# The schema, read once from the declarations above: section name -> class, and the (field, type) pairs
# of each section. Types come from get_type_hints so string annotations would work too.
_SECTIONS: dict[str, type] = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
_SPECS: dict[str, list[tuple[dataclasses.Field, Any]]] = {
    name: [(f, get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()
}
_KEYS: list[str] = [f"{name}.{f.name}" for name, specs in _SPECS.items() for f, _ in specs]
#: Every dotted key of the tree (``"rollout.top_p"``, ...), in declaration order.
FIELD_KEYS: tuple[str, ...] = tuple(_KEYS)


def explain_config() -> str:
    """Every field of the tree: dotted key, type, default, allowed values, and its documentation."""
    import textwrap

    lines = []
    for name, cls in _SECTIONS.items():
        lines.append(f"{name}: {cls.__doc__.strip()}")
        defaults = cls()
        for f, tp in _SPECS[name]:
            meta = f.metadata
            allowed = (f"one of {', '.join(map(str, meta['choices']))}" if meta["choices"] is not None
                       else _range_text(meta))
            head = f"  {name}.{f.name}  ({_type_name(tp)}; default {getattr(defaults, f.name)!r}"
            lines.append(head + (f"; {allowed})" if allowed else ")"))
            lines.extend(textwrap.wrap(meta["doc"], width=100, initial_indent="      ", subsequent_indent="      "))
        lines.append("")
    return "\n".join(lines)


def field_doc(key: str) -> str:
    """The one documentation string of the dotted ``key`` (``ConfigError`` for an unknown key)."""
    section, _, name = key.partition(".")
    for f, _tp in _SPECS.get(section, []):
        if f.name == name:
            return f.metadata["doc"]
    raise _unknown(key, "field_doc", _KEYS)

# A YAML 1.2 float; PyYAML follows YAML 1.1, which reads 2e-6 (no dot) as a string.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _WrongType(Exception):
    pass


def _error(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _unknown(key: str, where: str, candidates: list[str]) -> ConfigError:
    # A known field name under the wrong section ('rollout.lr') is the likeliest slip; else spelling.
    leaf = key.rsplit(".", 1)[-1]
    match = [k for k in _KEYS if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, candidates, n=1)
    hint = f"; did you mean '{match[0]}'?" if match else ""
    return _error(where, f"unknown key '{key}'{hint}")


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_optional(tp):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return tp.__name__


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise _WrongType. bool is not an int here (True for a step count is a
    slip), ints widen to float, and numeric strings become floats (see _NUMBER)."""
    if _is_optional(tp):  # a union: null if allowed, else the first alternative the value fits
        if value is None and type(None) in get_args(tp):
            return None
        for alt in (a for a in get_args(tp) if a is not type(None)):
            try:
                return _convert(value, alt)
            except _WrongType:
                continue
        raise _WrongType
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        return [_convert(v, get_args(tp)[0]) for v in value]
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _WrongType


def _range_text(meta: Mapping[str, Any]) -> str | None:
    lo = ("[", meta["ge"]) if meta["ge"] is not None else ("(", meta["gt"]) if meta["gt"] is not None else None
    hi = ("]", meta["le"]) if meta["le"] is not None else (")", meta["lt"]) if meta["lt"] is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return None


def _in_range(x: Any, meta: Mapping[str, Any]) -> bool:
    return (
        (meta["ge"] is None or x >= meta["ge"])
        and (meta["gt"] is None or x > meta["gt"])
        and (meta["le"] is None or x <= meta["le"])
        and (meta["lt"] is None or x < meta["lt"])
    )


def _check(value: Any, f: dataclasses.Field, tp: Any, key: str, where: str) -> Any:
    """One value converted to its field's type and checked against its declaration."""
    meta = f.metadata
    if meta["choices"] is not None:
        for i, x in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(x, (list, dict)) or x not in meta["choices"]:
                name = f"{key}[{i}]" if isinstance(value, list) else key
                raise _error(where, f"{name}: must be one of {', '.join(meta['choices'])}, got {x!r}")
    try:
        value = _convert(value, tp)
    except _WrongType:
        raise _error(where, f"{key}: expected {_type_name(tp)}, got {_describe(value)}") from None
    if meta["length"] is not None and len(value) != meta["length"]:
        raise _error(where, f"{key}: must have {meta['length']} items, got {len(value)}")
    items = value if isinstance(value, list) else [value]
    for i, x in enumerate(items):
        name = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(x, float) and not math.isfinite(x):
            raise _error(where, f"{name}: must be a finite number, got {x!r}")
        if x is not None and not _in_range(x, meta):
            raise _error(where, f"{name}: must be {_range_text(meta)}, got {x!r}")
    return value


def _check_combinations(cfg: Config, origins: Mapping[str, str], source: str) -> None:
    """Constraints between fields, which per-field metadata cannot express."""

    def where(*keys: str) -> str:
        return next((origins[k] for k in keys if k in origins), source)

    o, opt, t = cfg.objective, cfg.optim, cfg.teacher
    if cfg.eval.greedy and cfg.eval.n_samples != 1:
        raise _error(where("eval.n_samples", "eval.greedy"),
                     "eval.greedy=true gives one answer per problem: eval.n_samples must be 1, got "
                     f"{cfg.eval.n_samples}")
    try:
        from opdkit.eval.benchmarks import _check_template

        _check_template(cfg.eval.prompt_template)
    except ValueError as exc:
        raise _error(where("eval.prompt_template"), f"eval.prompt_template: {exc}") from None
    if o.tail_bucket and o.renormalize:
        raise _error(
            where("objective.tail_bucket", "objective.renormalize"),
            "objective.tail_bucket=true requires objective.renormalize=false "
            "(inside a renormalised support the tail mass is 0)",
        )
    if o.kind == "support_kl" and o.support == "teacher_topp" and o.renormalize and o.support_min_k < 2:
        raise _error(where("objective.support_min_k", "objective.renormalize"),
                     f"objective.support_min_k={o.support_min_k} with objective.renormalize=true: the KL of a "
                     "renormalised one-id support is 0, so a confident position would teach nothing; use 2 or more")
    if o.support == "teacher_topp" and o.support_min_k >= o.top_k:
        raise _error(where("objective.support_min_k", "objective.top_k"),
                     f"objective.support_min_k ({o.support_min_k}) must be below objective.top_k ({o.top_k}), "
                     "the most ids a nucleus support may have: at or above it every position keeps all top_k "
                     "ids and objective.support_top_p does nothing (that is objective.support=teacher_topk)")
    if o.support == "teacher_topp" and o.support_top_p >= 1.0:
        raise _error(where("objective.support_top_p"),
                     "objective.support_top_p=1 keeps all objective.top_k ids at every position and "
                     "objective.support_min_k does nothing: use objective.support=teacher_topk, or a mass below 1")
    if opt.total_steps > 0 and opt.warmup_steps > opt.total_steps:
        raise _error(
            where("optim.warmup_steps", "optim.total_steps"),
            f"optim.warmup_steps ({opt.warmup_steps}) must not exceed optim.total_steps ({opt.total_steps})",
        )
    if t.path is not None and t.url is not None:
        raise _error(where("teacher.url", "teacher.path"),
                     "set teacher.path or teacher.url, not both (teacher.path=null clears a path the file sets)")
    _check_inert(cfg, where)


def _inert_rules(cfg: Config) -> list[tuple[str, bool, str]]:
    """``(key, inert, why)``: settings that nothing reads in this configuration (see _check_inert)."""
    o, m, t = cfg.objective, cfg.model, cfg.teacher
    pg = o.kind == "sampled_token"
    remote = t.url is not None
    server_side = "it acts on a local teacher (teacher.path); a remote teacher's server sets it (opdkit serve-teacher)"
    skl = o.kind == "support_kl"
    return [
        ("objective.gamma", not pg, "it acts only with objective.kind=sampled_token"),
        ("objective.reward_clip", not pg, "it acts only with objective.kind=sampled_token"),
        ("objective.ppo_clip_eps", not (pg and cfg.optim.mini_batches > 1),
         "it acts only with objective.kind=sampled_token and optim.mini_batches > 1 (PPO clipping)"),
        ("objective.topp_correction", not (pg and (cfg.rollout.top_p < 1 or cfg.rollout.top_k > 0)),
         "it acts only with objective.kind=sampled_token and truncated rollouts, rollout.top_p < 1 or "
         "rollout.top_k > 0 (untruncated rollouts need no correction)"),
        ("objective.topp_correction_clip", not (pg and o.topp_correction == "sequence"),
         "it acts only with objective.topp_correction=sequence"),
        ("objective.support", not skl, "it acts only with objective.kind=support_kl"),
        ("objective.support_top_p", not (skl and o.support == "teacher_topp"),
         "it acts only with objective.support=teacher_topp"),
        ("objective.support_min_k", not (skl and o.support == "teacher_topp"),
         "it acts only with objective.support=teacher_topp"),
        ("objective.renormalize", not skl, "it acts only with objective.kind=support_kl"),
        ("objective.divergence", not skl, "it acts only with objective.kind=support_kl"),
        ("objective.tail_bucket", not skl, "it acts only with objective.kind=support_kl"),
        ("objective.fused", not skl, "it acts only with objective.kind=support_kl"),
        ("objective.jsd_beta", not (skl and o.divergence == "jsd"), "it acts only with objective.divergence=jsd"),
        ("objective.top_k", o.kind == "full_reverse_kl", "the full reverse KL's support is the whole vocabulary"),
        ("objective.drop_special_from_support", o.kind == "full_reverse_kl" or o.special_tokens == [],
         "it acts only on support sets of a top-K objective, with objective.special_tokens not empty"),
        ("objective.special_token_mode", o.special_tokens == [], "objective.special_tokens is empty"),
        ("eval.temperature", cfg.eval.greedy, "eval.greedy=true decodes greedily"),
        ("eval.top_p", cfg.eval.greedy, "eval.greedy=true decodes greedily"),
        ("rollout.vllm_kv_cache_gb", cfg.rollout.engine != "vllm", "it acts only with rollout.engine=vllm"),
        ("teacher.api", not remote, "it acts only with teacher.url"),
        ("teacher.token_file", not remote, "it acts only with teacher.url"),
        ("teacher.timeout_s", not remote, "it acts only with teacher.url"),
        ("teacher.retries", not remote, "it acts only with teacher.url"),
        ("teacher.served_model", not remote or t.api == "opdkit", "it acts only with a vLLM teacher.url "
         "(teacher.api=openai or auto)"),
        ("teacher.tokenizer_path", not remote or t.api == "opdkit", "it acts only with a vLLM teacher.url "
         "(teacher.api=openai or auto); an opdkit server sends its own tokenizer"),
        ("teacher.dtype", remote, server_side),
        ("teacher.chunk_size", remote, server_side),
        ("teacher.trust_remote_code", remote, server_side),
        ("teacher.per_task", remote, "per-task teachers are local models (teacher.path); a remote teacher serves "
         "every task"),
        ("data.task_weights", cfg.data.task_sampling != "weighted", "it acts only with data.task_sampling=weighted"),
        ("model.lora_alpha", m.lora_r == 0, "it acts only with model.lora_r > 0"),
        ("model.lora_dropout", m.lora_r == 0, "it acts only with model.lora_r > 0"),
        ("model.lora_target_modules", m.lora_r == 0, "it acts only with model.lora_r > 0"),
    ]


def _check_inert(cfg: Config, where) -> None:
    """A setting changed from its default where nothing reads it is refused, not silently ignored."""
    for key, inert, why in _inert_rules(cfg):
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if inert and value != getattr(_SECTIONS[section](), name):
            raise _error(where(key), f"{key} = {value!r} has no effect here: {why}; remove it or change that setting")


def _build(raw: Any, origins: Mapping[str, str], source: str) -> Config:
    """A validated Config from plain data; ``origins`` maps a dotted key to where its value came from."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _error(source, f"expected a mapping of sections ({', '.join(_SECTIONS)}), got {_describe(raw)}")
    for name in raw:
        if str(name) not in _SECTIONS:
            raise _unknown(str(name), origins.get(str(name), source), list(_SECTIONS) + _KEYS)
    sections = {}
    for name, cls in _SECTIONS.items():
        where = origins.get(name, source)
        body = raw.get(name)
        if body is None:  # a section whose fields are all commented out
            body = {}
        if not isinstance(body, Mapping):
            raise _error(where, f"'{name}' is a section: expected a mapping of its fields, got {_describe(body)}")
        for key in body:
            if f"{name}.{key}" not in _KEYS:
                raise _unknown(f"{name}.{key}", origins.get(f"{name}.{key}", where), _KEYS)
        values, defaults = {}, cls()
        for f, tp in _SPECS[name]:
            key = f"{name}.{f.name}"
            # Defaults are checked too: cheap, and it keeps the declarations honest.
            value = body[f.name] if f.name in body else getattr(defaults, f.name)
            values[f.name] = _check(value, f, tp, key, origins.get(key, where))
        sections[name] = cls(**values)
    cfg = Config(**sections)
    _check_combinations(cfg, origins, source)
    return cfg


def _parse_overrides(overrides: Iterable[str] | Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(dotted key, value, where) for each override; string values are parsed as YAML."""
    if isinstance(overrides, Mapping):
        return [(str(k), v, f"override {k!r}") for k, v in overrides.items()]
    if isinstance(overrides, str):  # a lone string would otherwise be read one character at a time
        overrides = [overrides]
    parsed = []
    for text in overrides:
        where = f"override {text!r}"
        key, eq, value = str(text).partition("=")
        if not eq or not key.strip():
            raise _error(where, "expected key=value, e.g. rollout.top_p=0.95")
        try:
            parsed.append((key.strip(), yaml.safe_load(value), where))
        except yaml.YAMLError as e:
            raise _error(where, f"cannot parse the value as YAML: {getattr(e, 'problem', None) or e}") from None
    return parsed


def _apply(
    raw: Mapping[str, Any], origins: Mapping[str, str], overrides: Iterable[str] | Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Overrides applied to a copy of the plain data; later overrides win."""
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    origins = dict(origins)
    for key, value, where in _parse_overrides(overrides):
        if key in _SECTIONS:
            example = f"{key}.{_SPECS[key][0][0].name}=..."
            raise _error(where, f"'{key}' is a section; override one field at a time, e.g. {example}")
        if key not in _KEYS:
            raise _unknown(key, where, _KEYS)
        section, _, name = key.partition(".")
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):  # otherwise _build reports the malformed section
            raw[section][name] = value
        origins[key] = where
    return raw, origins


def _read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's data (as yaml.safe_load gives it) and the line of every key, so errors can point into it."""
    name = str(path)
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ConfigError(f"{name}: is a directory, not a config file (expected a YAML file)")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{name} line {line}: not UTF-8 text; is this a YAML config file?") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config file: {e.strerror or e}") from e
    loader = yaml.SafeLoader(text)

    def where(node: yaml.Node) -> str:
        return f"{name} line {node.start_mark.line + 1}"

    def pairs(node: yaml.MappingNode, prefix: str):
        # safe_load keeps the last of duplicate keys silently; a config that says two things is an error.
        seen: dict[str, yaml.Node] = {}
        for knode, _ in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(loader.construct_object(knode))
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise ConfigError(f"{where(knode)}: duplicate key '{prefix}{key}' (first at line {first})")
            seen[key] = knode
        loader.flatten_mapping(node)  # expand '<<: *anchor' merges as safe_load does
        for knode, vnode in node.value:
            yield str(loader.construct_object(knode)), knode, vnode

    try:
        root = loader.get_single_node()
        if root is None:  # an empty file: all defaults
            return {}, {}
        if not isinstance(root, yaml.MappingNode):
            value = loader.construct_object(root, deep=True)
            raise ConfigError(
                f"{where(root)}: expected a mapping of sections ({', '.join(_SECTIONS)}), got {_describe(value)}"
            )
        raw: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for section, knode, vnode in pairs(root, ""):
            origins[section] = where(knode)
            if isinstance(vnode, yaml.MappingNode):
                raw[section] = {}
                for key, fknode, fvnode in pairs(vnode, f"{section}."):
                    raw[section][key] = loader.construct_object(fvnode, deep=True)
                    origins[f"{section}.{key}"] = where(fknode)
            else:
                raw[section] = loader.construct_object(vnode, deep=True)
        return raw, origins
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{name}{line}: invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """Load a YAML config (defaults when ``path`` is None), apply ``section.field=value`` overrides in order
    (values parsed as YAML, e.g. ``model.path=null``, ``objective.special_tokens=['<think>']``; or a
    mapping of dotted keys to Python values), and validate. Raises ConfigError."""
    raw, origins = _read_yaml(path) if path is not None else ({}, {})
    source = str(path) if path is not None else "<defaults>"
    # Values are checked after the overrides, so an override can repair a value the file got wrong.
    raw, origins = _apply(raw, origins, overrides)
    return _build(raw, origins, source)


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """A validated Config from nested plain data (``{"optim": {"lr": 1e-5}}``); missing fields get defaults.
    ``source`` prefixes error messages."""
    return _build(d, {}, source)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain data (fresh lists), sections and fields in declaration order."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Config, overrides: Iterable[str] | Mapping[str, Any]) -> Config:
    """A new validated Config with ``section.field=value`` overrides applied (or a mapping of dotted keys
    to Python values, which avoids YAML parsing of e.g. paths); ``cfg`` is unchanged."""
    raw, origins = _apply(config_to_dict(cfg), {}, overrides)
    return _build(raw, origins, "<config>")


def validate_config(cfg: Config) -> Config:
    """Check a Config built in Python (its constructors do not validate); returns it with values normalised
    (ints in float fields become floats). Raises ConfigError."""
    return apply_overrides(cfg, ())


class _Dumper(yaml.SafeDumper):
    """Writes lists on one line ([0.9, 0.999]) so a saved config reads like a hand-written one."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def config_to_yaml(cfg: Config) -> str:
    """The YAML text save_config writes: every field, sections in declaration order, a blank line between."""
    # Not allow_unicode: PyYAML then writes some characters (U+0085, U+2028) raw, and reads them back as
    # spaces; escaped non-ASCII is less pretty but exact.
    blocks = [
        yaml.dump({name: body}, Dumper=_Dumper, sort_keys=False, width=120)
        for name, body in config_to_dict(cfg).items()
    ]
    return "# opdkit config; `opdkit config --explain` documents every field\n" + "\n".join(blocks)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (config_to_yaml), creating the parent directory; ``load_config(path) == cfg``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
