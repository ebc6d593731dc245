"""Tags on versions (key/value, searchable)."""

from __future__ import annotations

from sqlalchemy import select

from ..models import VersionTag
from . import names
from .context import RegistryContext
from .events import emit
from .refs import resolve
from .views import VersionView, version_view


def set_tags(ctx: RegistryContext, ref: str, tags: dict[str, str]) -> VersionView:
    tags = names.tags(tags)
    with ctx.db.write() as s:
        v = resolve(s, ref)
        current = {k: val for k, val in s.execute(
            select(VersionTag.key, VersionTag.value).where(VersionTag.version_id == v.id))}
        names.tag_budget({**current, **tags}, max_count=ctx.settings.max_tags, max_bytes=ctx.settings.max_tag_bytes)
        for key, value in tags.items():
            row = s.get(VersionTag, (v.id, key))
            if row is None:
                s.add(VersionTag(version_id=v.id, key=key, value=value))
            else:
                row.value = value
        emit(s, "version.tags_set", model_name=v.model.name, version_id=v.id, ref=v.ref, tags=tags)
        s.flush()
        return version_view(s, v)


def delete_tag(ctx: RegistryContext, ref: str, key: str) -> VersionView:
    with ctx.db.write() as s:
        v = resolve(s, ref)
        row = s.get(VersionTag, (v.id, key))
        if row is not None:
            s.delete(row)
            emit(s, "version.tag_deleted", model_name=v.model.name, version_id=v.id, ref=v.ref, key=key)
        s.flush()
        return version_view(s, v)
