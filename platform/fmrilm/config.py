"""One config system: pydantic models loaded from YAML, with dotted ``key=value`` overrides.

Unknown keys are rejected with the key's full dotted path in the message, so a typo in a spec
or an override never silently falls back to a default.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fmrilm import storage
from fmrilm.errors import UserError, embeds_credentials, redact


class ConfigError(UserError, ValueError):
    """A spec or override is malformed; the message names the file and the key path."""


class Strict(BaseModel):
    """Base for every spec model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageSpec(Strict):
    """Base of every stage spec: one shape, ``data: {root, datasets, split}`` for what it reads and
    ``run: {storage, name}`` for where it writes; keys of the older shapes are refused with the
    key that replaced them."""

    moved_keys: ClassVar[dict[str, str]] = {"datasets": "data.datasets", "split": "data.split"}

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, value):
        if isinstance(value, dict):
            moved = [f"{old} is now {new}" for old, new in cls.moved_keys.items() if old in value]
            if moved:
                raise ValueError("; ".join(moved))
            run, default = value.get("run"), cls.model_fields.get("run")
            if isinstance(run, dict) and "name" not in run and default is not None and default.default is not None:
                value = {**value, "run": {**run, "name": default.default.name}}  # `run: {storage: X}` keeps the stage's name
        return value


RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class RunLocation(Strict):
    """Where a run lives: ``<storage>/<name>/`` (re-running the same name resumes or reuses it).
    Every stage spec that writes a run holds one as ``run``."""

    storage: str = "./fmrilm-data/runs"
    name: str = Field("run", pattern=RUN_NAME)


M = TypeVar("M", bound=BaseModel)
MAX_YAML_VALUES = 100_000  # values a YAML document may expand to through its aliases (a spec or card has hundreds)


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = key_node.value
                if key in seen:
                    raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is written twice in one mapping; keep one")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """How many values ``node`` stands for once every alias is expanded (shared nodes counted
    each time they are referenced, computed once each)."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise ConfigError("a YAML alias refers to the collection that contains it")
        return sizes[key]
    sizes[key] = None
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, sizes) for v in node.value)
    else:
        size = 1
    sizes[key] = min(size, 10 * MAX_YAML_VALUES)
    return sizes[key]


def parse_yaml(text: str) -> Any:
    """Parse one YAML document safely: no Python objects, no key written twice in one mapping, no
    aliases expanding past :data:`MAX_YAML_VALUES` values (a few hundred bytes of nested aliases
    otherwise take minutes and gigabytes to walk). Raises :class:`ConfigError` or ``yaml.YAMLError``."""
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values: write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    except ConfigError as err:
        raise ConfigError(f"override {text!r}: {err}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with dotted overrides applied (nested dicts are created)."""
    data = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each with the full dotted key path."""
    lines = [f"invalid spec {source}:"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "<root>"
        if problem["type"] == "value_error" and not problem["loc"]:  # a model's own check (StageSpec's moved keys)
            lines.append(f"  {problem['msg'].removeprefix('Value error, ')}")
        elif problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's key, a dataclass's key
            lines.append(f"  {key}: unknown key (check the spelling; see the spec's documented keys)")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {redact(repr(problem.get('input')))})")
    return "\n".join(lines)


def credential_keys(data, prefix: str = "") -> list[str]:
    """Dotted keys of every string value in ``data`` that embeds credentials in a URI."""
    if isinstance(data, dict):
        return [k for key, v in data.items() for k in credential_keys(v, f"{prefix}{key}.")]
    if isinstance(data, list):
        return [k for i, v in enumerate(data) for k in credential_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(data, str) and embeds_credentials(data) else []


URI_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "http", "https")  # storage, plus endpoints and dashboard addresses


def unsupported_uris(data, prefix: str = "") -> list[str]:
    """``key (scheme)`` of every string value in ``data`` that is a URI of a scheme fmrilm cannot read."""
    if isinstance(data, dict):
        return [k for key, v in data.items() for k in unsupported_uris(v, f"{prefix}{key}.")]
    if isinstance(data, list):
        return [k for i, v in enumerate(data) for k in unsupported_uris(v, f"{prefix}{i}.")]
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://", data) if isinstance(data, str) else None
    return [f"{prefix.rstrip('.')} ({scheme.group(1)}://)"] if scheme and scheme.group(1).lower() not in URI_SCHEMES else []


def build(model: type[M], data: dict, source: str = "<spec>") -> M:
    """Validate ``data`` into ``model``; raise :class:`ConfigError` naming every bad key. A value
    that embeds credentials in a URI is refused (naming the key, never the value), and so is a
    URI of a scheme no storage here reads (before any work starts)."""
    secret = credential_keys(data)
    if secret:
        raise ConfigError(f"invalid spec {source}: {', '.join(secret)} embed(s) credentials in a URI (scheme://user:secret@... or a ?secret=... query): "
                          "remove them; credentials come from the environment or the instance/pod role, never from a spec")
    unknown = unsupported_uris(data)
    if unknown:
        raise ConfigError(f"invalid spec {source}: {', '.join(unknown)}: fmrilm reads local paths, file://, s3:// and gs:// URIs; "
                          "copy the data there or mount it as a local path")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_yaml(uri: str) -> dict:
    """Read a YAML mapping from any URI."""
    try:
        text = storage.read_text(storage.resolve(uri))
    except FileNotFoundError:
        raise ConfigError(f"spec file {uri} does not exist") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{uri} is not valid YAML: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{uri}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{uri} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def load(model: type[M], uri: str, overrides: list[str] | None = None) -> M:
    """Load a spec of type ``model`` from a YAML URI with dotted overrides applied."""
    data = apply_overrides(load_yaml(uri), overrides or [])
    return build(model, data, uri)


def dump(spec: BaseModel) -> str:
    """The spec as YAML (round-trips through :func:`load`)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
