"""Reading and curating versions in process: refs, search, aliases, tags, promote, archive, models.

The real-HTTP tests (``tests/test_api.py`` and the others) stay for the protocol; these check the
service logic underneath, directly.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from registry.errors import Conflict, InvalidInput, NotFound
from registry.models import Event
from registry.services import aliases, catalog, tags, versions
from registry.services.versions import VersionFilter

from .inproc import InProcess, weights_bytes

pytestmark = pytest.mark.services


def _event_types(reg: InProcess) -> list[str]:
    with reg.ctx.db.read() as s:
        return list(s.scalars(select(Event.type).order_by(Event.id)))


def test_refs_by_number_alias_and_latest(reg: InProcess) -> None:
    reg.push_weights("m", 1, aliases=["stable"])
    reg.push_weights("m", 2)
    reg.push_weights("m", 3, status="candidate")  # never "latest" until promoted
    assert versions.get(reg.ctx, "m@1").version == 1
    assert versions.get(reg.ctx, "m@stable").version == 1
    assert versions.get(reg.ctx, "m").version == 2
    assert versions.get(reg.ctx, "m@latest").version == 2
    assert versions.get(reg.ctx, "m@3").status == "candidate"


@pytest.mark.parametrize(("ref", "code"), [
    ("nope@1", "model_not_found"), ("m@9", "version_not_found"), ("m@ghost", "version_not_found"),
])
def test_unknown_refs_are_not_found(reg: InProcess, ref: str, code: str) -> None:
    reg.push_weights("m", 1)
    with pytest.raises(NotFound) as e:
        versions.get(reg.ctx, ref)
    assert e.value.code == code


@pytest.mark.parametrize("ref", ["m@0", "m@1@2", "bad name@1", "m@"])
def test_malformed_refs_are_invalid(reg: InProcess, ref: str) -> None:
    with pytest.raises(InvalidInput) as e:
        versions.get(reg.ctx, ref)
    assert e.value.code == "invalid_ref"


def test_search_filters_and_pages_newest_first(reg: InProcess) -> None:
    base = reg.push_base("llm")
    reg.push_adapter("sql-lora", base=base.ref, seed=1, tags={"task": "sql", "lang": "en"})
    reg.push_adapter("chat-lora", base=base.ref, seed=2, tags={"task": "chat"})
    reg.push_weights("other", 5, tags={"task": "sql"})

    def refs(**kw: object) -> list[str]:
        rows, _ = versions.search(reg.ctx, VersionFilter(**kw))  # type: ignore[arg-type]
        return [v.ref for v in rows]

    assert refs() == ["other@1", "chat-lora@1", "sql-lora@1", "llm@1"]
    assert refs(kind="adapter") == ["chat-lora@1", "sql-lora@1"]
    assert refs(tags={"task": "sql"}) == ["other@1", "sql-lora@1"]
    assert refs(tags={"task": "sql", "lang": None}) == ["sql-lora@1"]
    assert refs(base="llm@1") == ["chat-lora@1", "sql-lora@1"]
    assert refs(base="unknown@1") == []
    assert refs(prefix="sql") == ["sql-lora@1"]
    assert refs(model="llm") == ["llm@1"]

    page1, cursor = versions.search(reg.ctx, VersionFilter(limit=3))
    assert [v.ref for v in page1] == ["other@1", "chat-lora@1", "sql-lora@1"] and cursor is not None
    page2, end = versions.search(reg.ctx, VersionFilter(limit=3, cursor=cursor))
    assert [v.ref for v in page2] == ["llm@1"] and end is None
    with pytest.raises(InvalidInput):
        versions.search(reg.ctx, VersionFilter(status="weird"))


def test_aliases_move_and_are_removed(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    reg.push_weights("m", 2)
    assert aliases.set_alias(reg.ctx, "m", "prod", "1")["ref"] == "m@1"
    assert aliases.set_alias(reg.ctx, "m", "prod", "m@2")["ref"] == "m@2"
    assert versions.get(reg.ctx, "m@prod").version == 2
    assert aliases.list_aliases(reg.ctx, "m") == [{"model": "m", "alias": "prod", "version": 2, "ref": "m@2"}]
    aliases.delete_alias(reg.ctx, "m", "prod")
    assert aliases.list_aliases(reg.ctx, "m") == []
    with pytest.raises(NotFound) as e:
        aliases.delete_alias(reg.ctx, "m", "prod")
    assert e.value.code == "alias_not_found"
    assert _event_types(reg).count("alias.set") == 2 and "alias.deleted" in _event_types(reg)


def test_alias_rules(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    reg.push_weights("n", 2)
    with pytest.raises(InvalidInput) as e:
        aliases.set_alias(reg.ctx, "m", "prod", "n@1")
    assert e.value.code == "invalid_alias_target"
    for bad in ("1", "latest", "-x"):
        with pytest.raises(InvalidInput) as e:
            aliases.set_alias(reg.ctx, "m", bad, "m@1")
        assert e.value.code == "invalid_alias"


def test_version_tags_set_overwrite_delete_and_budget(reg: InProcess) -> None:
    reg.push_weights("m", 1, tags={"a": "1"})
    v = tags.set_tags(reg.ctx, "m@1", {"a": "2", "b": "x"})
    assert v.tags == {"a": "2", "b": "x"}
    assert tags.delete_tag(reg.ctx, "m@1", "a").tags == {"b": "x"}
    assert tags.delete_tag(reg.ctx, "m@1", "absent").tags == {"b": "x"}  # deleting nothing is fine
    reg.ctx.settings.max_tags = 2
    with pytest.raises(InvalidInput) as e:
        tags.set_tags(reg.ctx, "m@1", {"c": "1", "d": "2"})
    assert e.value.code == "too_many_tags"
    assert versions.get(reg.ctx, "m@1").tags == {"b": "x"}


def test_promote_candidate_to_ready_and_latest(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    reg.push_weights("m", 2, status="candidate")
    assert versions.get(reg.ctx, "m").version == 1
    v = versions.promote(reg.ctx, "m@2", "prod", actor="alice")
    assert (v.status, v.aliases) == ("ready", ["prod"])
    assert versions.get(reg.ctx, "m").version == 2
    assert versions.promote(reg.ctx, "m@2", None, actor="alice").status == "ready"  # idempotent
    assert _event_types(reg).count("version.promoted") == 1


def test_promote_refuses_archived(reg: InProcess) -> None:
    reg.push_weights("m", 1, status="candidate")
    versions.archive(reg.ctx, "m@1", actor="alice")
    with pytest.raises(Conflict) as e:
        versions.promote(reg.ctx, "m@1", None, actor="alice")
    assert e.value.code == "archived"


def test_archive_hides_version_and_drops_its_aliases(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    reg.push_weights("m", 2, aliases=["prod"])
    v = versions.archive(reg.ctx, "m@2", actor="alice")
    assert v.archived and v.aliases == []
    assert versions.get(reg.ctx, "m").version == 1  # latest falls back
    assert versions.get(reg.ctx, "m@2").archived  # still resolvable by number
    rows, _ = versions.search(reg.ctx, VersionFilter(model="m"))
    assert [r.ref for r in rows] == ["m@1"]
    rows, _ = versions.search(reg.ctx, VersionFilter(model="m", include_archived=True))
    assert [r.ref for r in rows] == ["m@2", "m@1"]
    assert versions.archive(reg.ctx, "m@2", actor="alice").archived  # again: no-op
    with pytest.raises(NotFound):
        versions.get(reg.ctx, "m@prod")
    assert "version.archived" in _event_types(reg)
    # an archived version no longer blocks its files from being pushed again
    assert reg.push_weights("m", 2).ref == "m@3"


def test_archive_refused_while_dependents_live(reg: InProcess) -> None:
    base = reg.push_base("llm")
    reg.push_adapter("lora", base=base.ref)
    with pytest.raises(Conflict) as e:
        versions.archive(reg.ctx, "llm@1", actor="alice")
    assert e.value.code == "has_dependents" and e.value.details == {"dependents": ["lora@1"]}
    versions.archive(reg.ctx, "lora@1", actor="alice")
    assert versions.archive(reg.ctx, "llm@1", actor="alice").archived


def test_models_catalog(reg: InProcess) -> None:
    m = catalog.create_model(reg.ctx, "empty", "base", description="no versions yet", tags={"team": "a"})
    assert (m.name, m.kind, m.latest_version, m.version_count, m.tags) == ("empty", "base", None, 0, {"team": "a"})
    with pytest.raises(Conflict) as e:
        catalog.create_model(reg.ctx, "empty", "base")
    assert e.value.code == "model_exists"
    reg.push_weights("m", 1, aliases=["prod"])
    reg.push_weights("m", 2)
    got = catalog.get(reg.ctx, "m")
    assert (got.latest_version, got.version_count, got.aliases) == (2, 2, {"prod": 1})
    catalog.set_model_tag(reg.ctx, "m", "owner", "bob")
    models, _ = catalog.list_models(reg.ctx, tag={"owner": "bob"})
    assert [x.name for x in models] == ["m"]
    assert catalog.delete_model_tag(reg.ctx, "m", "owner").tags == {}
    models, cursor = catalog.list_models(reg.ctx, limit=1)
    assert [x.name for x in models] == ["empty"] and cursor == "empty"
    with pytest.raises(NotFound) as e2:
        catalog.get(reg.ctx, "ghost")
    assert e2.value.code == "model_not_found"


def test_views_of_a_page_match_the_tables(reg: InProcess) -> None:
    """A page's views come from one statement over the related tables (tags, aliases, parents,
    base, files): each view must say exactly what those tables hold, version by version, for
    versions with and without each kind of related row, read by ref and in a search page."""
    from registry.models import Alias, LineageEdge, Model, ModelVersion, VersionFile, VersionTag

    base = reg.push_base("llm", tags={"b": "1"}, aliases=["prod", "blue"])
    reg.push_adapter("lora", base=base.ref, tags={"z": "last", "a": "first"})
    reg.push_weights("merged", 3, parents=[{"ref": "llm@1", "relation": "merge_of", "params": {"weight": 0.5}},
                                           {"ref": "lora@1", "relation": "merge_of", "params": {"w": [1, 2]}}])
    reg.push_files("multi", {"b.safetensors": weights_bytes(8, names=("b",)),
                                "a.safetensors": weights_bytes(9, names=("a",))})
    reg.push_weights("plain", 4)
    with reg.ctx.db.read() as s:
        rows = s.execute(select(ModelVersion.id, Model.name, ModelVersion.version, ModelVersion.base_version_id)
                         .join(Model, Model.id == ModelVersion.model_id)).all()
        ref_of = {vid: f"{n}@{v}" for vid, n, v, _ in rows}
        expected = {}
        for vid, _, _, base_id in rows:
            expected[ref_of[vid]] = {
                "tags": dict(sorted(s.execute(select(VersionTag.key, VersionTag.value)
                                              .where(VersionTag.version_id == vid)).all())),
                "aliases": sorted(s.scalars(select(Alias.name).where(Alias.version_id == vid))),
                "parents": [(ref_of[p], rel, params or {}) for p, rel, params in s.execute(
                    select(LineageEdge.parent_id, LineageEdge.relation, LineageEdge.params)
                    .where(LineageEdge.child_id == vid).order_by(LineageEdge.id))],
                "base": ref_of[base_id] if base_id else None,
                "files": [(p, sha, size) for p, sha, size in s.execute(
                    select(VersionFile.path, VersionFile.blob_sha256, VersionFile.size)
                    .where(VersionFile.version_id == vid).order_by(VersionFile.path))],
            }
    assert expected["llm@1"]["aliases"] == ["blue", "prod"] and expected["lora@1"]["base"] == "llm@1"
    assert len(expected["merged@1"]["parents"]) == 2 and len(expected["multi@1"]["files"]) == 2

    def seen(v, with_files: bool):  # type: ignore[no-untyped-def]
        out = {"tags": v.tags, "aliases": v.aliases, "parents": [(p.ref, p.relation, p.params) for p in v.parents],
               "base": v.base}
        if with_files:
            out["files"] = [(f.path, f.sha256, f.size) for f in v.files]
        return out

    for ref, want in expected.items():
        assert seen(versions.get(reg.ctx, ref), True) == want, ref
        assert list(versions.get(reg.ctx, ref).tags) == sorted(want["tags"])
    page, _ = versions.search(reg.ctx, VersionFilter(limit=50))
    assert {v.ref for v in page} == set(expected)
    for v in page:
        assert v.files is None
        assert seen(v, False) == {k: x for k, x in expected[v.ref].items() if k != "files"}, v.ref
