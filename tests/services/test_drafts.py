"""Pushing versions through the draft service, in process: create, add files by bytes or link
them by sha256, commit, duplicates, abort.

These tests call the service functions directly (see ``tests/services/conftest.py``); the tests
that start a real server and speak HTTP (``tests/test_api.py`` and the others) stay: they cover
the protocol (status codes, streaming bodies, headers), which this layer does not see.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from registry.errors import BadRequest, Conflict, InvalidInput, NotFound
from registry.models import Blob, Draft, ModelVersion
from registry.services import versions

from .inproc import InProcess, sha, weights_bytes

pytestmark = pytest.mark.services


def _blob_states(reg: InProcess) -> dict[str, str]:
    with reg.ctx.db.read() as s:
        return dict(s.execute(select(Blob.sha256, Blob.state)).all())


def test_push_by_bytes_creates_version_one_with_files_in_the_store(reg: InProcess) -> None:
    w = weights_bytes(1)
    draft_id = reg.draft("m", tags={"team": "nlp"}, aliases=["prod"], description="first")
    added = reg.add_bytes(draft_id, "model.safetensors", w)
    assert added == {"path": "model.safetensors", "sha256": sha(w), "size": len(w), "deduplicated": False}
    assert _blob_states(reg) == {sha(w): "pending"}  # claimed before commit, bytes still staged
    assert not reg.ctx.store.exists(sha(w))

    v = reg.commit(draft_id)
    assert (v.ref, v.version, v.kind, v.status) == ("m@1", 1, "base", "ready")
    assert v.tags == {"team": "nlp"} and v.aliases == ["prod"] and v.description == "first"
    assert [(f.path, f.sha256, f.size) for f in v.files or []] == [("model.safetensors", sha(w), len(w))]
    assert v.summary["tensors"] == 1 and v.created_by == "tester"
    assert reg.ctx.store.read_bytes(sha(w)) == w
    assert _blob_states(reg) == {sha(w): "ready"}
    with reg.ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Draft)) == 0
    assert not (reg.ctx.staging.root / draft_id).exists()


def test_versions_number_up_per_model(reg: InProcess) -> None:
    refs = [reg.push_files("m", {"model.safetensors": weights_bytes(i)}).ref for i in range(3)]
    other = reg.push_files("other", {"model.safetensors": weights_bytes(9)})
    assert refs == ["m@1", "m@2", "m@3"] and other.ref == "other@1"


def test_link_by_sha_reuses_stored_bytes(reg: InProcess) -> None:
    w = weights_bytes(1)
    reg.push_files("a", {"model.safetensors": w})
    draft_id = reg.draft("b")
    linked = reg.link(draft_id, "weights/model.safetensors", sha(w))
    assert linked == {"path": "weights/model.safetensors", "sha256": sha(w), "size": len(w), "deduplicated": True}
    v = reg.commit(draft_id)
    assert v.ref == "b@1" and [f.path for f in v.files or []] == ["weights/model.safetensors"]
    assert [o.sha256 for o in reg.ctx.store.list_objects()] == [sha(w)]  # stored once


def test_link_unknown_or_wrong_size_blob_is_not_found(reg: InProcess) -> None:
    w = weights_bytes(1)
    draft_id = reg.draft("m")
    with pytest.raises(NotFound) as e:
        reg.link(draft_id, "model.safetensors", sha(w))
    assert e.value.code == "blob_not_found"
    reg.push_files("a", {"model.safetensors": w})
    with pytest.raises(NotFound) as e:
        reg.link(draft_id, "model.safetensors", sha(w), size=len(w) + 1)
    assert e.value.code == "blob_not_found"
    with pytest.raises(BadRequest) as e2:
        reg.link(draft_id, "model.safetensors", "not-a-sha")
    assert e2.value.code == "invalid_sha256"


def test_same_files_again_is_a_duplicate_conflict(reg: InProcess) -> None:
    w = weights_bytes(1)
    reg.push_files("m", {"model.safetensors": w})
    draft_id = reg.draft("m")
    reg.add_bytes(draft_id, "model.safetensors", w)
    with pytest.raises(Conflict) as e:
        reg.commit(draft_id)
    assert e.value.code == "duplicate_content" and e.value.details == {"existing": "m@1"}
    with reg.ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 1
    # the same files under another path are another version
    assert reg.push_files("m", {"other.safetensors": w}).ref == "m@2"


def test_wrong_expected_sha_leaves_nothing(reg: InProcess) -> None:
    draft_id = reg.draft("m")
    with pytest.raises(BadRequest) as e:
        reg.add_bytes(draft_id, "model.safetensors", weights_bytes(1), expected_sha256="0" * 64)
    assert e.value.code == "checksum_mismatch"
    assert reg.get_draft(draft_id)["files"] == []
    assert _blob_states(reg) == {}


def test_invalid_weights_are_refused_on_arrival(reg: InProcess) -> None:
    draft_id = reg.draft("m")
    with pytest.raises(InvalidInput):
        reg.add_bytes(draft_id, "model.safetensors", b"this is not a safetensors file")
    assert reg.get_draft(draft_id)["files"] == []


def test_commit_without_files_or_weights_is_refused(reg: InProcess) -> None:
    draft_id = reg.draft("m")
    with pytest.raises(InvalidInput) as e:
        reg.commit(draft_id)
    assert e.value.code == "empty_version"
    reg.add_bytes(draft_id, "README.md", b"# no weights here\n")
    with pytest.raises(InvalidInput) as e:
        reg.commit(draft_id)
    assert e.value.code == "missing_weights"
    assert reg.get_draft(draft_id)["id"] == draft_id  # a failed commit keeps the draft


def test_abort_releases_claims_nothing_else_holds(reg: InProcess) -> None:
    kept, own = weights_bytes(1), weights_bytes(2)
    reg.push_files("a", {"model.safetensors": kept})
    draft_id = reg.draft("m")
    reg.link(draft_id, "kept.safetensors", sha(kept))
    reg.add_bytes(draft_id, "own.safetensors", own)
    assert _blob_states(reg) == {sha(kept): "ready", sha(own): "pending"}

    reg.abort(draft_id)
    assert _blob_states(reg) == {sha(kept): "ready"}  # the linked blob belongs to a@1
    assert reg.ctx.store.exists(sha(kept))
    assert not (reg.ctx.staging.root / draft_id).exists()
    with pytest.raises(NotFound) as e:
        reg.get_draft(draft_id)
    assert e.value.code == "draft_not_found"
    with pytest.raises(NotFound):
        reg.commit(draft_id)


def test_draft_spec_is_checked_before_any_byte(reg: InProcess) -> None:
    with pytest.raises(InvalidInput) as e:
        reg.draft("bad name!")
    assert e.value.code == "invalid_name"
    with pytest.raises(InvalidInput) as e:
        reg.draft("m", kind="weird")
    assert e.value.code == "invalid_kind"
    with pytest.raises(InvalidInput) as e:
        reg.draft("m", base="nothing@1")
    assert e.value.code == "unknown_base"
    with pytest.raises(InvalidInput) as e:
        reg.draft("m", parents=[{"ref": "m@1", "relation": "cousin_of"}])
    assert e.value.code == "invalid_relation"
    reg.push_files("m", {"model.safetensors": weights_bytes(1)})
    with pytest.raises(Conflict) as e2:
        reg.draft("m", kind="adapter")
    assert e2.value.code == "kind_mismatch"


def test_adapter_needs_a_base_and_matching_shapes(reg: InProcess) -> None:
    base = reg.push_base("llm")
    v = reg.push_adapter("lora", base=base.ref, tags={"task": "sql"})
    assert (v.kind, v.base, v.status) == ("adapter", "llm@1", "ready")
    assert [(p.ref, p.relation) for p in v.parents] == [("llm@1", "adapter_of")]
    assert v.summary["r"] == 4
    # the same adapter against an unrelated checkpoint with other tensor shapes
    odd = reg.push_files("odd", {"model.safetensors": weights_bytes(5)})
    from registry.demo import make_adapter

    from .inproc import RANK, TINY

    folder = make_adapter(reg.folder("again"), seed=1, r=RANK, shape=TINY, init_seed=7)
    with pytest.raises(InvalidInput) as e:
        reg.push_folder("lora", folder, base=odd.ref)
    assert e.value.code == "shape_mismatch"
    with pytest.raises(InvalidInput) as e:
        reg.push_folder("lora2", folder)  # no base
    assert e.value.code == "base_required"
    assert versions.get(reg.ctx, "lora").ref == "lora@1"


def test_resumable_upload_in_chunks(reg: InProcess) -> None:
    w = weights_bytes(1, shape=(64, 64))
    draft_id = reg.draft("m")
    upload = reg.start_upload(draft_id, "model.safetensors", len(w))
    third = len(w) // 3
    assert reg.append(upload, 0, w[:third]) == third
    with pytest.raises(Conflict) as e:  # a chunk resent at a stale offset
        reg.append(upload, 0, w[:third])
    assert e.value.code == "offset_mismatch" and e.value.details["received"] == third
    assert reg.append(upload, third, w[third:2 * third]) == 2 * third
    with pytest.raises(Conflict) as e:
        reg.finish_upload(upload, sha(w))
    assert e.value.code == "upload_incomplete"
    reg.append(upload, 2 * third, w[2 * third:])
    assert reg.finish_upload(upload, sha(w)) == {"path": "model.safetensors", "sha256": sha(w), "size": len(w),
                                                 "deduplicated": False}
    assert reg.commit(draft_id).files[0].sha256 == sha(w)  # type: ignore[index]


def test_upload_with_wrong_sha_is_discarded(reg: InProcess) -> None:
    w = weights_bytes(1)
    draft_id = reg.draft("m")
    upload = reg.start_upload(draft_id, "model.safetensors", None)
    reg.append(upload, 0, w)
    with pytest.raises(BadRequest) as e:
        reg.finish_upload(upload, "0" * 64)
    assert e.value.code == "checksum_mismatch"
    with pytest.raises(NotFound) as e2:
        reg.finish_upload(upload, sha(w))
    assert e2.value.code == "upload_not_found"
    assert reg.get_draft(draft_id)["files"] == [] and _blob_states(reg) == {}
