"""One message for a YAML file that does not validate: the run config, the audit config, a hospital's policy.

Pydantic reports every error with its location; the user gets the first one as ``FILE: KEY.PATH: what is
wrong``, an unknown key with the keys its section allows, and a section validator's message that starts
with one of its own keys (``"shares: ..."``) placed under that key. Imports nothing but pydantic.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

__all__ = ["describe_validation_error", "key_path", "validate_mapping"]


def validate_mapping(model: type[M], data: Any, source: str, error: type[Exception]) -> M:
    """``data`` (a YAML file's top level) validated as ``model``; otherwise one ``error`` naming ``source`` and
    the key (:func:`describe_validation_error`)."""
    if not isinstance(data, dict):
        raise error(f"{source}: the top level must be a mapping of sections, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(describe_validation_error(e, model, source)) from None


def key_path(loc: tuple) -> str:
    """``("tasks", "train", 0, "name")`` -> ``tasks.train[0].name``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """The first error of ``error`` (raised validating ``model``) as one line naming ``source`` and the key."""
    err = error.errors()[0]
    where = key_path(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    head, sep, rest = msg.partition(": ")
    if where and sep and re.fullmatch(r"[a-z_]+", head):  # a section's validator naming its own key
        where, msg = f"{where}.{head}", rest
    return f"{source}: {where}: {msg}" if where else f"{source}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the section at ``loc`` (through nested sections, lists and mappings of sections)."""
    current: Any = model
    for part in loc:
        current = _optional(current)
        origin = typing.get_origin(current)
        if _is_section(current) and isinstance(part, str) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif origin is list and isinstance(part, int) or origin is dict and isinstance(part, str):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _optional(current)
    return list(current.model_fields) if _is_section(current) else []


def _optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
