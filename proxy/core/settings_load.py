"""Loading the configuration through pydantic-settings, with errors that name their source.

Sources, lowest precedence first: the model's defaults, the YAML file (or a mapping given
by a caller), then ``MIRRORGATE_<SECTION>__<FIELD>`` environment variables (pydantic-
settings' ``EnvSettingsSource``: prefix ``MIRRORGATE_``, ``__`` between levels, case-
insensitive). Environment values are strings as given: a token ``123456``, ``yes``,
``*k9Zp`` or ``null`` stays that string; pydantic converts a string only where the field
asks for a number, a boolean or a list (JSON, e.g. ``["a","b"]``).

Every error line names where the bad value came from: the environment variable, or the
file and the key. A ``MIRRORGATE_`` variable that looks like an override but is not one
(one underscore where two were meant, an unknown section) is an error that suggests the
closest real name, instead of being silently ignored.

This module is generic over the model class so that ``proxy.core.config`` keeps only the
field definitions (and stays a file others can add fields to without conflicts).
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from proxy.core.errors import ConfigError

ENV_PREFIX = "MIRRORGATE_"
DELIMITER = "__"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``X | None`` or ``Optional[X]``; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            inner = _submodel(arg)
            if inner is not None:
                return inner
    return None


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf field path of ``model`` (sections recurse; dict/list fields are leaves)."""
    for name, info in model.model_fields.items():
        inner = _submodel(info.annotation)
        if inner is None:
            yield (*prefix, name)
        else:
            yield from field_paths(inner, (*prefix, name))


def _model_at(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in path:
        info = model.model_fields.get(str(part))
        inner = _submodel(info.annotation) if info is not None else None
        if inner is None:
            return None
        model = inner
    return model


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + DELIMITER.join(path).upper()


def _settings_class(model: type[BaseModel]) -> type[BaseSettings]:
    """A BaseSettings twin of ``model``: pydantic-settings' sources read its fields.

    The sources only produce a dict; validation is the plain model's, so constructing
    ``MirrorgateConfig`` in code never reads the environment behind a caller's back.
    """
    cached = _SETTINGS_CLASSES.get(model)
    if cached is None:
        cached = type(
            f"{model.__name__}Settings",
            (model, BaseSettings),
            {
                "model_config": SettingsConfigDict(
                    env_prefix=ENV_PREFIX,
                    env_nested_delimiter=DELIMITER,
                    case_sensitive=False,
                    env_parse_none_str=None,
                    extra="forbid",
                ),
                "__module__": __name__,
            },
        )
        _SETTINGS_CLASSES[model] = cached
    return cached


_SETTINGS_CLASSES: dict[type[BaseModel], type[BaseSettings]] = {}


class _MappingEnvSource(EnvSettingsSource):
    """``EnvSettingsSource`` over a given mapping (tests, compose files) instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = {k.lower(): v for k, v in env.items()}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._env


def _check_env_names(model: type[BaseModel], env: Mapping[str, str]) -> list[str]:
    """Errors for ``MIRRORGATE_`` variables that look like overrides but match no field."""
    sections = set(model.model_fields)
    joined = {"_".join(p): p for p in field_paths(model)}
    problems = []
    for key in sorted(env):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        rest = upper[len(ENV_PREFIX) :].lower()
        if DELIMITER in rest:
            head = rest.split(DELIMITER, 1)[0]
            if head in sections:
                continue  # below a real section pydantic reports unknown keys by path
            near = difflib.get_close_matches(head, sorted(sections), n=1)
            suggestion = f"; did you mean section {near[0]!r}?" if near else ""
            problems.append(f"environment variable {key}: no section {head!r}{suggestion}")
            continue
        if rest in sections or not any(rest.startswith(s + "_") for s in sections):
            # A whole section as JSON, or another tool's variable (MIRRORGATE_CONFIG, ...).
            continue
        if rest in joined:
            right = env_name(joined[rest])
        else:
            matches = difflib.get_close_matches(rest, sorted(joined), n=1, cutoff=0.6)
            right = env_name(joined[matches[0]]) if matches else ""
        hint = f"; did you mean {right}?" if right else ""
        problems.append(
            f"environment variable {key} is not a configuration override (levels are "
            f"separated by a double underscore){hint}"
        )
    return problems


def _env_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _env_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(settings_cls: type[BaseSettings], path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    # The file itself goes through pydantic-settings' YAML source (same parser, checked
    # above so its errors are ours and carry the file name).
    return dict(YamlConfigSettingsSource(settings_cls, yaml_file=path)())


def _describe_error(
    model: type[BaseModel], err: Any, source: str, env_paths: dict[tuple[str, ...], str]
) -> str:
    loc = tuple(str(p) for p in err["loc"])
    path = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        parent = _model_at(model, loc[:-1])
        if parent is not None and loc:
            close = difflib.get_close_matches(loc[-1], sorted(parent.model_fields), n=1)
            if close:
                msg += f" (did you mean {'.'.join((*loc[:-1], close[0]))!r}?)"
    else:
        msg = err["msg"]
    origin = None
    for n in range(len(loc), 0, -1):
        origin = env_paths.get(loc[:n])
        if origin is not None:
            break
    if origin is None:
        # An error about a section's own rule (a model validator) may come from a key
        # set in the environment below it: name those variables too.
        below = [v for p, v in env_paths.items() if p[: len(loc)] == loc and loc]
        where = f"{source}, key {path}" if source else f"key {path}"
        if below:
            where += "; environment: " + ", ".join(sorted(below))
    else:
        where = f"environment variable {origin}"
    return f"{path}: {msg} [{where}]"


def _parses(settings_cls: type[BaseSettings], env: Mapping[str, str]) -> bool:
    try:
        _MappingEnvSource(settings_cls, env)()
    except SettingsError:
        return False
    return True


def load_settings(
    model: type[BaseModel],
    path: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Validate ``model`` from defaults < YAML file (or ``data``) < environment."""
    settings_cls = _settings_class(model)
    environ = dict(os.environ if env is None else env)
    problems = _check_env_names(model, environ)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    if path is not None:
        source = str(path)
        raw = _read_yaml(settings_cls, Path(path))
    else:
        source = "<mapping>"
        raw = {k: v for k, v in dict(data or {}).items()}
    try:
        from_env = _MappingEnvSource(settings_cls, environ)()
    except SettingsError as exc:
        # pydantic-settings names the section only: find the variable by trying each alone.
        bad = [
            k
            for k in sorted(environ)
            if k.upper().startswith(ENV_PREFIX) and not _parses(settings_cls, {k: environ[k]})
        ]
        which = ", ".join(bad) or "a MIRRORGATE_ variable"
        raise ConfigError(
            f"invalid configuration:\n  environment variable {which}: not valid JSON for a "
            'list or mapping field (e.g. ["a","b"])'
        ) from exc
    env_paths: dict[tuple[str, ...], str] = {}
    for p in _env_paths(from_env):
        env_paths[p] = env_name(p)
    merged = _deep_merge(raw, from_env)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        lines = [_describe_error(model, e, source, env_paths) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from exc
