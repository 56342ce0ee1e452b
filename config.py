"""Config files: a task's YAML read round-trip (comments kept), `--opts a.b=v` overrides applied, written
back to `output_dir/config.yaml`, and built into the task's nested dataclasses. An unknown key is an
error naming the closest valid key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING

import torch.distributed as tdist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

logger = logging.getLogger(__name__)

# Keys the original's files carry that nothing reads; a config that still has one loads, with a warning.
REMOVED_KEYS = {
    "eval_ema": "NLVR's switch, unused by the original too",
    "coco_file": "Grounding's COCO file, read by the original and used by nothing",
    "decay_rate": "a no-op of the original's lr scheduler with one cosine cycle",
    "cooldown_epochs": "a no-op of the original's lr scheduler with one cosine cycle",
}


class ConfigError(ValueError):
    """A config file or an `--opts` override that does not fit the task's schema."""


def _round_trip() -> YAML:
    yaml = YAML()  # round-trip: comments, key order and flow style survive save_config
    yaml.preserve_quotes = True
    return yaml


def load_config(path: str, opts: list[str] | None, schema: type) -> tuple[typing.Any, typing.Any]:
    """Read `path`, apply `opts` ("a.b=value", the value parsed as YAML), build the dataclass `schema`
    (fields typed as dataclasses are nested sections). Returns (config, ruamel document with the
    overrides applied) so the script can `save_config` what it actually ran."""
    path = str(path)
    try:
        with open(path) as f:
            doc = _round_trip().load(f) or {}
    except (OSError, YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    from_opts = set()
    for opt in opts or []:
        key, sep, text = opt.partition("=")
        parts, node = key.strip().split("."), doc
        if not sep or not all(parts):
            raise ConfigError(f"--opts {opt!r}: expected key=value")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--opts {opt!r}: '{'.'.join(parts[:i + 1])}' in {path} is not a section")
        try:
            node[parts[-1]] = YAML(typ="safe", pure=True).load(text)
        except YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--opts {opt!r}: the value is not valid YAML: {problem}") from e
        from_opts.add(".".join(parts))
    return _build(schema, doc, "", (path, from_opts)), doc


def save_config(doc: typing.Any, path: str) -> None:
    """Write the document from `load_config`, comments kept; rank 0 only."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            _round_trip().dump(doc, f)


def config_to_dict(cfg: typing.Any) -> dict:
    """Plain nested dict of a config dataclass (a checkpoint's `config`: loads with weights_only)."""
    return dataclasses.asdict(cfg)


def _build(schema: type, data: Mapping, prefix: str, ctx: tuple[str, set[str]]):
    path, from_opts = ctx
    fields, hints = {f.name: f for f in dataclasses.fields(schema) if f.init}, typing.get_type_hints(schema)
    for key in map(str, data):
        if key not in fields and key in REMOVED_KEYS:
            logger.warning("config key '%s%s' in %s is ignored: %s", prefix, key, _source(ctx, [prefix + key]),
                           REMOVED_KEYS[key])
        elif key not in fields:
            where = _source(ctx, [prefix + key])
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}' in {where}; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, ctx)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path}: missing required key '{prefix}{name}'")
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as e:
        named = [prefix + k for k in fields if prefix + k in from_opts and k in str(e)]
        raise ConfigError(f"{_source(ctx, named)}: invalid {'section ' + prefix[:-1] if prefix else 'config'}: "
                          f"{e}") from e


def _source(ctx: tuple[str, set[str]], keys: list[str]) -> str:
    """Where the values of `keys` came from: the config file, or `--opts` when one of them was set there."""
    path, from_opts = ctx
    named = [k for k in keys if any(k == o or k.startswith((o + ".", o + "[")) for o in from_opts)]
    return f"--opts {', '.join(named)} (config file {path})" if named else path


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _coerce(value, tp, key: str, ctx: tuple[str, set[str]]):
    """`value` checked against the annotation `tp`, converted to plain Python types."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return _build(tp, value, key + ".", ctx)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(value, arg, key, ctx)
    elif tp in _SCALARS:
        if isinstance(value, _SCALARS[tp]) and (tp is bool or not isinstance(value, bool)):
            return tp(value)
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        items = [_coerce(v, args[0] if args else typing.Any, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    elif origin is dict and isinstance(value, Mapping):
        return {str(k): _coerce(v, args[1] if args else typing.Any, f"{key}.{k}", ctx) for k, v in value.items()}
    elif tp is typing.Any or (origin is typing.Literal and value in args):
        return _plain(value)
    name = getattr(tp, "__name__", None) or str(tp)
    raise ConfigError(f"{_source(ctx, [key])}: '{key}' expects {name}, got {type(value).__name__} {value!r}")


def _plain(value):
    """ruamel's commented and scalar subclasses → dict, list, bool, int, float, str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return next((t(value) for t in _SCALARS if isinstance(value, t)), value)
