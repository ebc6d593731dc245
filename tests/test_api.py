"""The REST API over real HTTP, on SQLite and on PostgreSQL: push/pull, shards, adapters, lineage,
aliases, search, pagination, ranges."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from registry.client import NotFound, RegistryAPIError
from registry.demo import Shape, make_adapter, make_base, random_weights, save_checkpoint

from .conftest import Server


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_health_and_openapi(server: Server) -> None:
    h = httpx.get(server.url + "/api/v1/health").json()
    assert h["status"] == "ok"
    assert h["database"] == ("postgresql" if server.backend == "postgres" else "sqlite")
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/api/v1/drafts/{draft_id}/commit" in spec["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_push_pull_round_trip_is_byte_identical(server: Server, demo: dict[str, Path], name: str,
                                                tmp_path: Path) -> None:
    with server.client() as rc:
        v = rc.push(demo["base"], name, tags={"stage": "dev"}, aliases=["production"], description="toy base")
        assert v.ref == f"{name}@1"
        assert v.kind == "base" and v.status == "ready" and v.storage_mode == "stored"
        assert v.tags == {"stage": "dev"} and v.aliases == ["production"]
        assert v.summary["tensors"] == len(random_weights()) and v.fingerprint
        rc.pull(f"{name}@production", tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(demo["base"])
    for f in v.files:
        assert f.sha256 == hashlib.sha256((demo["base"] / f.path).read_bytes()).hexdigest()


def test_sharded_model(server: Server, tmp_path: Path, name: str) -> None:
    folder = make_base(tmp_path / "sharded", seed=5, shards=3)
    with server.client() as rc:
        v = rc.push(folder, name)
        assert v.summary["sharded"] is True and v.summary["weight_files"] == 3
        assert v.fingerprint == rc.push(make_base(tmp_path / "single", seed=6), name).fingerprint
        rc.pull(f"{name}@1", tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(folder)


def test_adapter_pinned_to_base_and_lineage(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        base = rc.push(demo["base"], name + "-base")
        a1 = rc.push(demo["adapter-sql"], name + "-sql", base=base.ref)
        a2 = rc.push(demo["adapter-chat"], name + "-chat", base=base.ref, kind="adapter")
        ft = rc.push(demo["finetune"], name + "-ft", base=base.ref)
        merged = rc.push(demo["base-v2"], name + "-merge", kind="merge",
                         parents=[{"ref": ft.ref, "relation": "merge_of", "params": {"weight": 0.5}},
                                  {"ref": base.ref, "relation": "merge_of", "params": {"weight": 0.5}}])
        assert a1.kind == "adapter" and a1.base == base.ref
        assert [p.model_dump() for p in a1.parents] == [{"ref": base.ref, "relation": "adapter_of", "params": {}}]
        assert a1.summary["r"] == 8 and a1.summary["modules"] == 4
        assert ft.kind == "finetune" and ft.parents[0].relation == "finetune_of"
        assert {p.ref for p in merged.parents} == {ft.ref, base.ref}

        down = rc.lineage(base.ref, direction="down")
        assert {n.ref for n in down.nodes} == {base.ref, a1.ref, a2.ref, ft.ref, merged.ref}
        assert {(e.child, e.relation) for e in down.edges if e.parent == base.ref} == {
            (a1.ref, "adapter_of"), (a2.ref, "adapter_of"), (ft.ref, "finetune_of"),
            (merged.ref, "merge_of")}
        up = rc.lineage(merged.ref, direction="up")
        assert {n.ref for n in up.nodes} == {merged.ref, ft.ref, base.ref}
        assert ({"child": merged.ref, "parent": ft.ref, "relation": "merge_of", "params": {"weight": 0.5}}
                in [e.model_dump() for e in up.edges])
        pinned = rc.search_versions(base=base.ref, kind="adapter").items
        assert {v.ref for v in pinned} == {a1.ref, a2.ref}


def test_aliases_and_latest(server: Server, tmp_path: Path, name: str) -> None:
    with server.client() as rc:
        refs = [rc.push(make_base(tmp_path / f"b{i}", seed=100 + i), name).ref for i in range(3)]
        assert refs == [f"{name}@1", f"{name}@2", f"{name}@3"]
        assert rc.get_version(name).version == 3
        assert rc.get_version(f"{name}@latest").version == 3
        rc.set_alias(name, "production", 2)
        assert rc.get_version(f"{name}@production").version == 2
        rc.set_alias(name, "production", f"{name}@1")  # moves
        assert rc.get_version(f"{name}@production").version == 1
        assert [a.model_dump() for a in rc.list_aliases(name)] == [
            {"model": name, "alias": "production", "version": 1, "ref": f"{name}@1"}]
        assert rc.get_model(name).aliases == {"production": 1}
        rc.delete_alias(name, "production")
        with pytest.raises(NotFound) as e:
            rc.get_version(f"{name}@production")
        assert e.value.status == 404 and isinstance(e.value, RegistryAPIError)
        # archiving the newest moves "latest" back
        rc.archive(f"{name}@3")
        assert rc.get_version(name).version == 2
        assert rc.get_version(f"{name}@3").archived is True  # still resolvable by number
        m = rc.get_model(name)
        assert m.latest_version == 2 and m.version_count == 2


def test_search_filters_and_pagination(server: Server, tmp_path: Path, name: str) -> None:
    with server.client() as rc:
        base = rc.push(make_base(tmp_path / "base", seed=1), name + "-base", tags={"family": name})
        for i in range(7):
            rc.push(make_adapter(tmp_path / f"a{i}", seed=i), f"{name}-lora-{i % 3}", base=base.ref,
                    tags={"family": name, "task": f"t{i % 2}", "parity": "even" if i % 2 == 0 else "odd"})
        all_family = rc.search_versions(tags=[f"family={name}"], limit=100).items
        assert len(all_family) == 8
        assert [v.id for v in all_family] == sorted((v.id for v in all_family), reverse=True)
        adapters = rc.search_versions(tags=[f"family={name}"], kind="adapter", limit=100).items
        assert len(adapters) == 7
        t0_even = rc.search_versions(tags=[f"family={name}", "task=t0", "parity=even"], limit=100).items
        assert len(t0_even) == 4 and all(v.tags["task"] == "t0" for v in t0_even)
        assert rc.search_versions(tags=[f"family={name}", "task=t0", "parity=odd"]).items == []
        assert len(rc.search_versions(prefix=f"{name}-lora-1", limit=100).items) == 2
        assert len(rc.search_versions(model=f"{name}-lora-0", limit=100).items) == 3
        has_task = rc.search_versions(tags=[f"family={name}", "task"], limit=100).items
        assert len(has_task) == 7

        pages, cursor = [], None
        while True:
            page = rc.search_versions(tags=[f"family={name}"], limit=3, cursor=cursor)
            pages.append([v.ref for v in page.items])
            cursor = page.next_cursor
            if cursor is None:
                break
        assert [len(p) for p in pages] == [3, 3, 2]
        assert [r for p in pages for r in p] == [v.ref for v in all_family]
        assert list(v.ref for v in rc.iter_versions(tags=[f"family={name}"], limit=2)) == [
            v.ref for v in all_family]

        models = rc.list_models(prefix=f"{name}-lora-", limit=2)
        assert [m.name for m in models.items] == [f"{name}-lora-0", f"{name}-lora-1"]
        assert [m.name for m in rc.list_models(prefix=f"{name}-lora-", cursor=models.next_cursor).items] == [
            f"{name}-lora-2"]


def test_tags_on_versions_and_models(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        v = rc.push(demo["base"], name)
        assert rc.set_tags(v.ref, {"eval.mmlu": "0.61", "owner": "ml-platform"}).tags == {
            "eval.mmlu": "0.61", "owner": "ml-platform"}
        assert rc.delete_tag(v.ref, "owner").tags == {"eval.mmlu": "0.61"}
        assert rc.search_versions(tags=["eval.mmlu=0.61"], model=name).items[0].ref == v.ref
        assert rc.set_model_tag(name, "team", "nlp").tags == {"team": "nlp"}
        assert [m.name for m in rc.list_models(tags=["team=nlp"], prefix=name).items] == [name]


def test_range_etag_and_head(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        v = rc.push(demo["base"], name)
    f = next(f for f in v.files if f.path == "model.safetensors")
    data = (demo["base"] / "model.safetensors").read_bytes()
    url = f"{server.url}/api/v1/models/{name}/versions/1/files/model.safetensors"
    full = httpx.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{f.sha256}"' and full.headers["x-checksum-sha256"] == f.sha256
    assert int(full.headers["content-length"]) == len(data)
    assert "immutable" in full.headers["cache-control"]
    parts = []
    for start in range(0, len(data), 100_000):
        r = httpx.get(url, headers={"Range": f"bytes={start}-{min(start + 99_999, len(data) - 1)}"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {start}-{min(start + 99_999, len(data) - 1)}/{len(data)}"
        parts.append(r.content)
    assert b"".join(parts) == data
    assert httpx.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data) - 5}-"}).content == data[-5:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    assert httpx.get(url, headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"' + "0" * 64 + '"'})
    assert stale.status_code == 200 and stale.content == data
    head = httpx.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and head.content == b""
    alias_url = f"{server.url}/api/v1/models/{name}/versions/latest/files/model.safetensors"
    assert httpx.get(alias_url).headers["cache-control"] == "no-cache"


def test_dedup_links_identical_files(server: Server, tmp_path: Path, name: str) -> None:
    folder = make_base(tmp_path / "a", seed=11)
    with server.client() as rc:
        rc.push(folder, name)
        before = server.blob_files()
        (folder / "README.md").write_text("only this file is new\n")
        v2 = rc.push(folder, name)
        assert v2.version == 2
    # one new blob (the README); the weights and configs were linked, not stored again
    assert len(server.blob_files() - before) == 1


def test_resumable_upload_session(server: Server, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "big"
    tensors = {"w": __import__("torch").arange(300_000, dtype=__import__("torch").float32)}
    save_checkpoint(folder, tensors, Shape())
    data = (folder / "model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    api = server.url + "/api/v1"
    draft = httpx.post(api + "/drafts", json={"model": name}).json()
    up = httpx.post(f"{api}/drafts/{draft['id']}/uploads", json={"path": "model.safetensors", "size": len(data)}).json()
    half = len(data) // 2
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[:half], headers={"Upload-Offset": "0"}).json()[
        "received"] == half
    # a resend at the wrong offset is refused with the offset to resume from
    r = httpx.patch(f"{api}/uploads/{up['id']}", content=data[:10], headers={"Upload-Offset": "0"})
    assert r.status_code == 409 and r.json()["error"]["details"]["received"] == half
    assert httpx.get(f"{api}/uploads/{up['id']}").json()["received"] == half
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[half:],
                       headers={"Upload-Offset": str(half)}).json()["received"] == len(data)
    assert httpx.post(f"{api}/uploads/{up['id']}/commit", json={"sha256": sha}).status_code == 201
    for p in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert httpx.put(f"{api}/drafts/{draft['id']}/files/{p}", content=(folder / p).read_bytes()).status_code == 201
    v = httpx.post(f"{api}/drafts/{draft['id']}/commit").json()
    assert v["ref"] == f"{name}@1"
    got = httpx.get(f"{api}/models/{name}/versions/1/files/model.safetensors")
    assert got.content == data


def test_events_are_written_with_changes(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        start = rc.events(limit=1000)
        after = start[-1].id if start else 0
        v = rc.push(demo["base"], name, aliases=["staging"])
        rc.set_tags(v.ref, {"k": "v"})
        types = [(e.type, e.model) for e in rc.events(after=after, limit=1000) if e.model == name]
    assert types == [("version.created", name), ("alias.set", name), ("version.tags_set", name)]


def test_cli_round_trip(server: Server, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    p = server.cli("push", str(demo["base"]), "--name", name, "--tag", "stage=dev", "--alias", "production")
    assert p.stdout.strip().splitlines()[-1] == f"{name}@1"
    p = server.cli("push", str(demo["adapter-sql"]), "--name", name + "-sql", "--base", f"{name}@production")
    assert p.stdout.strip().splitlines()[-1] == f"{name}-sql@1"
    p = server.cli("pull", f"{name}-sql", str(tmp_path / "out"))
    assert _tree(tmp_path / "out") == _tree(demo["adapter-sql"])
    shown = json.loads(server.cli("show", f"{name}-sql@1", "--json").stdout)
    assert shown["base"] == f"{name}@1"
    listed = json.loads(server.cli("ls", name, "--json").stdout)
    assert {v["ref"] for v in listed} == {f"{name}@1", f"{name}-sql@1"}
    tree = server.cli("lineage", f"{name}@1").stdout
    assert f"adapter_of {name}-sql@1" in tree
    server.cli("alias", "set", name, "canary", "1")
    assert f"{name}@canary -> {name}@1" in server.cli("alias", "ls", name).stdout
    assert "eval=ok" in server.cli("tag", "set", f"{name}@1", "eval=ok").stdout
    bad = server.cli("show", "no-such-model-x", check=False)
    assert bad.returncode == 3 and "model_not_found" in bad.stderr  # 3: not found


def test_version_json_matches_response_model() -> None:
    """The version routes serialise ``VersionView`` straight to JSON (no second validation pass):
    it must carry exactly the fields of the documented ``VersionOut`` (and its parts)."""
    from dataclasses import fields

    from registry.api.schemas import FileOut, ParentOut, VersionOut
    from registry.services.views import FileView, ParentView, VersionView

    for view, out in ((VersionView, VersionOut), (ParentView, ParentOut), (FileView, FileOut)):
        assert [f.name for f in fields(view)] == list(out.model_fields), view.__name__
