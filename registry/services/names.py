"""Names users choose: models, aliases, tags. Checked once, here."""

from __future__ import annotations

import re

from ..errors import InvalidInput

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
MAX_TAG_VALUE = 1024
MAX_DESCRIPTION = 10_000
RESERVED_ALIASES = {"latest"}
KINDS = ("base", "adapter", "finetune", "merge")
FULL_MODEL_KINDS = ("base", "finetune", "merge")  # kinds that hold whole weights (a base can be one of these)


def model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise InvalidInput(
            f"invalid model name {name!r}: 1-128 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit", code="invalid_name", details={"name": name})
    return name


def alias_name(name: str) -> str:
    if not isinstance(name, str) or not ALIAS_RE.match(name):
        raise InvalidInput(
            f"invalid alias {name!r}: 1-64 characters from letters, digits, '.', '_', '-', starting "
            "with a letter", code="invalid_alias", details={"alias": name})
    if name in RESERVED_ALIASES:
        raise InvalidInput(f"alias {name!r} is reserved (it always means the newest ready version)",
                           code="invalid_alias", details={"alias": name})
    return name


def tag(key: str, value: str) -> tuple[str, str]:
    if not isinstance(key, str) or not TAG_KEY_RE.match(key):
        raise InvalidInput(
            f"invalid tag key {key!r}: 1-128 characters from letters, digits, '_', '.', ':', '/', '-'",
            code="invalid_tag", details={"key": key})
    if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
        raise InvalidInput(f"tag {key!r}: value must be a string of at most {MAX_TAG_VALUE} characters",
                           code="invalid_tag", details={"key": key})
    return key, value


def tags(pairs: dict[str, str] | None) -> dict[str, str]:
    return dict(tag(k, v) for k, v in (pairs or {}).items())


def kind(value: str) -> str:
    if value not in KINDS:
        raise InvalidInput(f"invalid kind {value!r}: one of {', '.join(KINDS)}", code="invalid_kind",
                           details={"kind": value})
    return value


def description(text: str | None) -> str:
    text = text or ""
    if len(text) > MAX_DESCRIPTION:
        raise InvalidInput(f"description longer than {MAX_DESCRIPTION} characters", code="invalid_description")
    return text
