"""A version created in one request from bytes the registry already holds (``POST
/api/v1/models/{name}/versions`` with a manifest), over real HTTP on SQLite and PostgreSQL: the
same checks and the same recording as a draft's commit, and nothing recorded when it is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.client import AsyncRegistryClient, Conflict, InvalidInput
from registry.demo import make_base

from .conftest import Server


def _manifest(v: Any) -> list[dict[str, Any]]:
    return [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in v.files]


def _state(server: Server) -> dict[str, int]:
    """Row counts that a refused create must leave as they were."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server.database_url)
    with engine.connect() as c:
        counts = {t: int(c.execute(text(f"select count(*) from {t}")).scalar_one())
                  for t in ("models", "model_versions", "version_files", "version_tags", "aliases", "events",
                            "blobs", "drafts")}
    engine.dispose()
    return counts


def test_create_from_held_blobs(server: Server, tmp_path: Path, name: str) -> None:
    folder = make_base(tmp_path / "b", seed=21)
    with server.client() as rc:
        src = rc.push(folder, name + "-src")
        blobs_before = server.blob_files()
        v = rc.create_version(name, _manifest(src), tags={"stage": "dev", "team": "a"},
                              aliases=["production", "latest-good"], description="made from a manifest")
        assert v.ref == f"{name}@1" and v.kind == "base" and v.status == "ready"
        assert v.tags == {"stage": "dev", "team": "a"} and v.aliases == ["latest-good", "production"]
        assert v.description == "made from a manifest"
        assert [(f.path, f.sha256, f.size) for f in v.files] == [(f.path, f.sha256, f.size) for f in src.files]
        # the same validation as a commit: the weights' summary and fingerprint
        assert v.fingerprint == src.fingerprint and v.summary == src.summary
        assert v.content_sha256 == src.content_sha256 and v.stored_bytes == 0
        # what the answer says is what a read says
        assert rc.get_version(f"{name}@production").model_dump() == v.model_dump()
        # a FileEntry list (another version's files) is a manifest too; the next number follows
        v2 = rc.create_version(name, rc.list_files(src.ref)[:2])  # two of its files: other content
        assert v2.version == 2
        types = [e.type for e in rc.events(limit=1000) if e.payload.get("ref") in (v.ref, v2.ref)]
        assert types.count("version.created") == 2 and types.count("alias.set") == 2
    assert server.blob_files() == blobs_before  # nothing stored: every byte was held already


def test_unknown_or_wrong_size_blob_is_refused_and_nothing_recorded(server: Server, tmp_path: Path,
                                                                    name: str) -> None:
    folder = make_base(tmp_path / "b", seed=22)
    with server.client() as rc:
        src = rc.push(folder, name + "-src")
    files = _manifest(src)
    unknown = hashlib.sha256(b"never uploaded " + name.encode()).hexdigest()
    bad = [*files, {"path": "extra.bin", "sha256": unknown, "size": 10}]
    wrong_size = [{**files[0], "size": files[0]["size"] + 1}, *files[1:]]
    before = _state(server)
    api = server.url + "/api/v1"
    r = httpx.post(f"{api}/models/{name}/versions", json={"files": bad, "tags": {"a": "b"}, "aliases": ["prod"]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "blob_not_found"
    assert err["details"]["missing"] == [{"path": "extra.bin", "sha256": unknown, "size": 10}]
    assert "extra.bin" in err["message"]
    with server.client() as rc, pytest.raises(InvalidInput) as e:
        rc.create_version(name, wrong_size)
    assert e.value.code == "blob_not_found" and [m["path"] for m in e.value.details["missing"]] == [files[0]["path"]]
    assert _state(server) == before  # no model, version, tag, alias, event or blob row


def test_duplicate_is_a_conflict_like_a_push(server: Server, tmp_path: Path, name: str) -> None:
    folder = make_base(tmp_path / "b", seed=23)
    with server.client() as rc:
        v = rc.push(folder, name)
        with pytest.raises(Conflict) as by_manifest:
            rc.create_version(name, _manifest(v), tags={"other": "tags"})
        with pytest.raises(Conflict) as by_push:
            rc.push(folder, name)
        assert by_manifest.value.code == by_push.value.code == "duplicate_content"
        assert by_manifest.value.details == by_push.value.details == {"existing": f"{name}@1"}
        # the same files under another model are a new version there
        assert rc.create_version(name + "-copy", _manifest(v)).ref == f"{name}-copy@1"


@pytest.mark.parametrize(("path", "code"), [("../escape.bin", "unsafe_path"), ("/abs/x.bin", "unsafe_path"),
                                            ("a//b.bin", "unsafe_path"), ("a\\b.bin", "unsafe_path")])
def test_bad_paths_are_refused(server: Server, tmp_path: Path, name: str, path: str, code: str) -> None:
    folder = make_base(tmp_path / "b", seed=24)
    with server.client() as rc:
        src = rc.push(folder, name + "-src")
    files = [*_manifest(src)[:1], {**_manifest(src)[0], "path": path}]
    r = httpx.post(f"{server.url}/api/v1/models/{name}/versions", json={"files": files})
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    assert httpx.get(f"{server.url}/api/v1/models/{name}").status_code == 404


def test_same_checks_as_a_commit(server: Server, tmp_path: Path, name: str) -> None:
    """Duplicate paths, an empty manifest, a malformed sha256, names, kind and base rules, and the
    weights' own validation (bytes that are no safetensors file under a weights name)."""
    folder = make_base(tmp_path / "b", seed=25)
    with server.client() as rc:
        src = rc.push(folder, name + "-src")
    files = _manifest(src)
    readme = next(f for f in files if f["path"] == "config.json")
    api = f"{server.url}/api/v1/models/{name}/versions"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"files": [files[0], files[0]]}, 422, "duplicate_path"),
        ({"files": []}, 422, "empty_version"),
        ({"files": [{"path": "x.bin", "sha256": "not-a-sha"}]}, 400, "invalid_sha256"),
        ({"files": files, "tags": {"": "x"}}, 422, "invalid_tag"),
        ({"files": files, "kind": "adapter"}, 422, "base_required"),
        ({"files": files, "base": "nosuchmodel@1"}, 422, "unknown_base"),
        ({"files": [{**readme, "path": "model.safetensors"}]}, 422, None),  # the safetensors check refuses it
    ]
    for body, status, code in cases:
        r = httpx.post(api, json=body)
        assert r.status_code == status, (body, r.text)
        got = r.json()["error"]["code"]
        assert code is None or got == code, (body, got)
    # the weights check answers as the draft path does, code and all
    d = httpx.post(f"{server.url}/api/v1/drafts", json={"model": name}).json()
    httpx.post(f"{server.url}/api/v1/drafts/{d['id']}/links", json={"path": "model.safetensors",
                                                                   "sha256": readme["sha256"]})
    by_commit = httpx.post(f"{server.url}/api/v1/drafts/{d['id']}/commit")
    by_manifest = httpx.post(api, json={"files": [{**readme, "path": "model.safetensors"}]})
    assert by_commit.status_code == by_manifest.status_code == 422
    assert by_commit.json()["error"]["code"] == by_manifest.json()["error"]["code"]
    assert httpx.get(f"{server.url}/api/v1/models/{name}").status_code == 404
    # a kind mismatch with the existing model is a conflict, as for a push
    with server.client() as rc:
        rc.create_version(name, files)
        adapter_like = {"files": files[:1], "kind": "merge"}
        r = httpx.post(api, json=adapter_like)
        assert r.status_code == 409 and r.json()["error"]["code"] == "kind_mismatch"


def test_adapter_with_base_and_parents(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        base = rc.push(demo["base"], name + "-base")
        src = rc.push(demo["adapter-sql"], name + "-src", base=base.ref)
        v = rc.create_version(name, _manifest(src), base=base.ref,
                              parents=[{"ref": src.ref, "relation": "merge_of", "params": {"w": 1}}])
        assert v.kind == "adapter" and v.base == base.ref
        assert [(p.ref, p.relation) for p in v.parents] == [(base.ref, "adapter_of"), (src.ref, "merge_of")]
        assert rc.get_version(v.ref).model_dump() == v.model_dump()


def test_async_client_and_cli(server: Server, tmp_path: Path, name: str) -> None:
    import asyncio

    folder = make_base(tmp_path / "b", seed=26)
    with server.client() as rc:
        src = rc.push(folder, name + "-src")

    async def go() -> str:
        async with AsyncRegistryClient(server.url, token="") as arc:
            return (await arc.create_version(name, _manifest(src), tags={"via": "async"})).ref

    assert asyncio.run(go()) == f"{name}@1"
    # the CLI: a manifest file (here what `registry show --json` prints), options added to it
    shown = server.cli("show", src.ref, "--json").stdout
    (tmp_path / "m.json").write_text(json.dumps({**json.loads(shown), "files": _manifest(src)[:2]}))
    p = server.cli("create", name, "--manifest", str(tmp_path / "m.json"), "--tag", "via=cli", "--alias", "prod")
    assert p.stdout.strip().splitlines()[-1] == f"{name}@2"
    with server.client() as rc:
        v = rc.get_version(f"{name}@prod")
        assert v.version == 2 and v.tags["via"] == "cli" and len(v.files) == 2
    (tmp_path / "bad.json").write_text('{"tags": {}}')
    refused = server.cli("create", name, "-m", str(tmp_path / "bad.json"), check=False)
    assert refused.returncode != 0 and "files" in refused.stderr
