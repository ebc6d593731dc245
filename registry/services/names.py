"""Names users choose: models, aliases, tags; and numbers parsed from text. Checked once, here.

Patterns are matched with ``fullmatch`` (``$`` would also match before a trailing newline), and
only ASCII digits make a number (``str.isdigit`` and ``int()`` accept ``²``, ``١``, ``1_0``, ``+1``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import InvalidInput

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
ASCII_DIGITS_RE = re.compile(r"[0-9]+")
MAX_TAG_VALUE = 1024
MAX_DESCRIPTION = 10_000
RESERVED_ALIASES = {"latest"}
KINDS = ("base", "adapter", "finetune", "merge")
FULL_MODEL_KINDS = ("base", "finetune", "merge")  # kinds that hold whole weights (a base can be one of these)


def ascii_uint(text: str) -> int | None:
    """The non-negative integer ``text`` spells in ASCII digits only, else None (no sign, no
    spaces, no ``_``, no other scripts' digits)."""
    if not isinstance(text, str) or ASCII_DIGITS_RE.fullmatch(text) is None:
        return None
    return int(text)


def is_model_name(name: object) -> bool:
    return isinstance(name, str) and MODEL_NAME_RE.fullmatch(name) is not None


def is_alias(name: object) -> bool:
    return isinstance(name, str) and ALIAS_RE.fullmatch(name) is not None


def model_name(name: str) -> str:
    if not is_model_name(name):
        raise InvalidInput(
            f"invalid model name {name!r}: 1-128 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit", code="invalid_name", details={"name": name})
    return name


def alias_name(name: str) -> str:
    if not is_alias(name):
        raise InvalidInput(
            f"invalid alias {name!r}: 1-64 characters from letters, digits, '.', '_', '-', starting "
            "with a letter", code="invalid_alias", details={"alias": name})
    if name in RESERVED_ALIASES:
        raise InvalidInput(f"alias {name!r} is reserved (it always means the newest ready version)",
                           code="invalid_alias", details={"alias": name})
    return name


def tag(key: str, value: str) -> tuple[str, str]:
    if not isinstance(key, str) or TAG_KEY_RE.fullmatch(key) is None:
        raise InvalidInput(
            f"invalid tag key {key!r}: 1-128 characters from letters, digits, '_', '.', ':', '/', '-'",
            code="invalid_tag", details={"key": key})
    if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
        raise InvalidInput(f"tag {key!r}: value must be a string of at most {MAX_TAG_VALUE} characters",
                           code="invalid_tag", details={"key": key})
    return key, value


def tags(pairs: dict[str, str] | None) -> dict[str, str]:
    if pairs is not None and not isinstance(pairs, dict):
        raise InvalidInput("tags must be an object of key: value strings", code="invalid_tag")
    return dict(tag(k, v) for k, v in (pairs or {}).items())


def tag_budget(all_tags: Mapping[str, str], *, max_count: int, max_bytes: int) -> None:
    """The tags a model or version would hold after a change: at most ``max_count`` of them and
    ``max_bytes`` of keys and values (UTF-8) together (``REGISTRY_MAX_TAGS``, ``REGISTRY_MAX_TAG_BYTES``)."""
    if len(all_tags) > max_count:
        raise InvalidInput(f"{len(all_tags)} tags: at most {max_count} per model or version",
                           code="too_many_tags", details={"count": len(all_tags), "limit": max_count})
    size = sum(len(k.encode()) + len(v.encode()) for k, v in all_tags.items())
    if size > max_bytes:
        raise InvalidInput(f"tags take {size} bytes: at most {max_bytes} per model or version",
                           code="tags_too_large", details={"bytes": size, "limit": max_bytes})


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
