"""Bad input: each case gets a clear 4xx with {error: {code, message, details}} and leaves no
partial state (no new version, model, blob row or stored object)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import create_engine, text

from registry.demo import Shape, lora_factors, make_base, random_weights, save_adapter, save_checkpoint

from .conftest import Server, make_server


def st_bytes(header: dict[str, Any], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def state(server: Server) -> tuple[int, int, int, frozenset[str]]:
    """Models, versions, stored blobs (``ready`` rows: a live draft's ``pending`` claims are, like
    its staged files, part of the draft) and store objects."""
    engine = create_engine(server.database_url)
    with engine.connect() as c:
        counts = tuple(c.execute(text(f"select count(*) from {t}")).scalar_one()
                       for t in ("models", "model_versions", "blobs where state = 'ready'"))
    engine.dispose()
    return (*counts, frozenset(server.blob_files()))  # type: ignore[return-value]


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def base_ref(server: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = make_base(tmp_path_factory.mktemp("bad-base") / "b", seed=42)
    with server.client() as rc:
        return str(rc.push(folder, "bad-input-base").ref)


class Api:
    def __init__(self, server: Server) -> None:
        self.url = server.url + "/api/v1"

    def draft(self, **spec: Any) -> httpx.Response:
        return httpx.post(self.url + "/drafts", json=spec)

    def put(self, draft_id: str, path: str, content: bytes, **headers: str) -> httpx.Response:
        return httpx.put(f"{self.url}/drafts/{draft_id}/files/{path}", content=content, headers=headers)

    def commit(self, draft_id: str) -> httpx.Response:
        return httpx.post(f"{self.url}/drafts/{draft_id}/commit")

    def push_folder(self, folder: Path, **spec: Any) -> httpx.Response:
        """Upload every file; return the first failing response, or the commit's."""
        d = self.draft(**spec)
        if d.status_code != 201:
            return d
        draft_id = d.json()["id"]
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                r = self.put(draft_id, p.relative_to(folder).as_posix(), p.read_bytes())
                if r.status_code >= 400:
                    return r
        return self.commit(draft_id)


@pytest.fixture
def api(server: Server) -> Api:
    return Api(server)


@pytest.fixture
def unchanged(server: Server) -> Any:
    """Asserts at the end of the test that nothing visible changed."""
    before = state(server)
    yield
    assert state(server) == before


def _upload_single(api: Api, name: str, path: str, content: bytes) -> httpx.Response:
    draft = api.draft(model=name).json()
    return api.put(draft["id"], path, content)


def _valid_st(tmp_path: Path) -> bytes:
    save_file({"w": torch.ones(4, 4), "b": torch.zeros(4)}, str(tmp_path / "x.safetensors"))
    return (tmp_path / "x.safetensors").read_bytes()


# --------------------------------------------------------------------------- safetensors files


def test_truncated_safetensors(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    data = _valid_st(tmp_path)
    err = assert_error(_upload_single(api, name, "model.safetensors", data[: len(data) - 7]), 422,
                       "invalid_safetensors")
    assert "truncated" in err["message"] and err["details"]["file"] == "model.safetensors"


def test_header_shorter_than_length_field(api: Api, name: str, unchanged: None) -> None:
    assert_error(_upload_single(api, name, "model.safetensors", b"\x01\x02\x03"), 422, "invalid_safetensors")


def test_corrupt_header_json(api: Api, name: str, unchanged: None) -> None:
    raw = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # unterminated
    err = assert_error(_upload_single(api, name, "model.safetensors", struct.pack("<Q", len(raw)) + raw + b"\0" * 4),
                       422, "invalid_safetensors")
    assert "JSON" in err["message"]


def test_header_over_the_limit(api: Api, name: str, unchanged: None) -> None:
    err = assert_error(_upload_single(api, name, "model.safetensors", struct.pack("<Q", 1 << 40) + b"{}"), 422,
                       "header_too_large")
    assert err["details"]["file"] == "model.safetensors"


def test_offsets_overlapping(api: Api, name: str, unchanged: None) -> None:
    data = st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    err = assert_error(_upload_single(api, name, "model.safetensors", data), 422, "invalid_safetensors")
    assert "overlap" in err["message"]


def test_offsets_out_of_bounds(api: Api, name: str, unchanged: None) -> None:
    data = st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    err = assert_error(_upload_single(api, name, "model.safetensors", data), 422, "invalid_safetensors")
    assert "truncated" in err["message"]


def test_offsets_disagree_with_shape(api: Api, name: str, unchanged: None) -> None:
    data = st_bytes({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    assert_error(_upload_single(api, name, "model.safetensors", data), 422, "invalid_safetensors")


def test_nan_weights(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    t = torch.ones(8, 8)
    t[3, 5] = float("nan")
    save_file({"layer.weight": t, "ok": torch.ones(2)}, str(tmp_path / "n.safetensors"))
    err = assert_error(_upload_single(api, name, "model.safetensors", (tmp_path / "n.safetensors").read_bytes()),
                       422, "non_finite")
    assert err["details"]["tensors"] == ["layer.weight"]


def test_pickled_weights_refused(api: Api, name: str, unchanged: None) -> None:
    err = assert_error(_upload_single(api, name, "pytorch_model.bin", b"\x80\x04K\x01."), 422, "unsafe_format")
    assert "pickle" in err["message"]


# --------------------------------------------------------------------------- paths and checksums


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../x", "/abs/file", "a//b", "a\\b", "./x", "x\x00y"])
def test_path_traversal_refused(api: Api, server: Server, name: str, path: str, unchanged: None) -> None:
    draft = api.draft(model=name).json()
    r = httpx.post(f"{api.url}/drafts/{draft['id']}/links", json={"path": path, "sha256": "0" * 64})
    assert_error(r, 422, "unsafe_path")


def test_path_traversal_in_upload_url(api: Api, name: str, unchanged: None) -> None:
    draft = api.draft(model=name).json()
    r = httpx.put(f"{api.url}/drafts/{draft['id']}/files/%2E%2E/%2E%2E/escape.json", content=b"{}")
    assert_error(r, 422, "unsafe_path")
    assert not any(Path("/").glob("escape.json"))


def test_wrong_sha256_on_upload(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    draft = api.draft(model=name).json()
    r = api.put(draft["id"], "model.safetensors", _valid_st(tmp_path), **{"X-Checksum-Sha256": "ab" * 32})
    err = assert_error(r, 400, "checksum_mismatch")
    assert err["details"]["expected"] == "ab" * 32


def test_wrong_sha256_at_upload_commit(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    data = _valid_st(tmp_path)
    draft = api.draft(model=name).json()
    up = httpx.post(f"{api.url}/drafts/{draft['id']}/uploads", json={"path": "model.safetensors"}).json()
    httpx.patch(f"{api.url}/uploads/{up['id']}", content=data, headers={"Upload-Offset": "0"})
    r = httpx.post(f"{api.url}/uploads/{up['id']}/commit", json={"sha256": hashlib.sha256(b"other").hexdigest()})
    assert_error(r, 400, "checksum_mismatch")
    assert_error(api.commit(draft["id"]), 422, "empty_version")


def test_link_unknown_blob(api: Api, name: str, unchanged: None) -> None:
    draft = api.draft(model=name).json()
    r = httpx.post(f"{api.url}/drafts/{draft['id']}/links", json={"path": "x.json", "sha256": "1" * 64})
    assert_error(r, 404, "blob_not_found")


# --------------------------------------------------------------------------- versions, refs, names


def test_duplicate_version_of_immutable_content(api: Api, server: Server, name: str, tmp_path: Path) -> None:
    folder = make_base(tmp_path / "b", seed=3)
    assert api.push_folder(folder, model=name).status_code == 201
    before = state(server)
    err = assert_error(api.push_folder(folder, model=name), 409, "duplicate_content")
    assert err["details"]["existing"] == f"{name}@1"
    assert state(server) == before


@pytest.mark.parametrize("ref", ["a@b@c", "a@", "@1", "a@0", "a b", "a@-x", "a@1.5"])
def test_bad_ref_syntax(api: Api, ref: str) -> None:
    assert_error(httpx.get(f"{api.url}/refs/{ref}"), 422, "invalid_ref")


def test_bad_base_ref_syntax_in_push(api: Api, name: str, unchanged: None) -> None:
    assert_error(api.draft(model=name, base="base@@1"), 422, "invalid_ref")


def test_unknown_base_ref(api: Api, name: str, unchanged: None) -> None:
    err = assert_error(api.draft(model=name, base="no-such-base@1"), 422, "unknown_base")
    assert err["details"]["ref"] == "no-such-base@1"


def test_unknown_model_and_file(api: Api, base_ref: str, name: str) -> None:
    assert_error(httpx.get(f"{api.url}/models/nope-{name}"), 404, "model_not_found")
    model = base_ref.split("@")[0]
    assert_error(httpx.get(f"{api.url}/models/{model}/versions/99"), 404, "version_not_found")
    assert_error(httpx.get(f"{api.url}/models/{model}/versions/1/files/none.txt"), 404, "file_not_found")


@pytest.mark.parametrize("spec,code", [
    ({"aliases": ["a" * 65]}, "invalid_alias"),
    ({"aliases": ["latest"]}, "invalid_alias"),
    ({"aliases": ["123"]}, "invalid_alias"),
    ({"tags": {"k" * 129: "v"}}, "invalid_tag"),
    ({"tags": {"ok": "v" * 1025}}, "invalid_tag"),
    ({"tags": {"bad key": "v"}}, "invalid_tag"),
    ({"kind": "checkpoint"}, "invalid_kind"),
])
def test_oversized_or_invalid_names(api: Api, name: str, spec: dict[str, Any], code: str, unchanged: None) -> None:
    assert_error(api.draft(model=name, **spec), 422, code)


def test_invalid_model_name(api: Api, unchanged: None) -> None:
    assert_error(api.draft(model="x" * 129), 422, "invalid_name")
    assert_error(api.draft(model="-leading-dash"), 422, "invalid_name")


def test_malformed_json_body(api: Api) -> None:
    r = httpx.post(f"{api.url}/drafts", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request")
    assert_error(httpx.post(f"{api.url}/drafts", json={"kind": "base"}), 422, "invalid_request")


def test_bad_pagination(api: Api) -> None:
    assert_error(httpx.get(f"{api.url}/versions", params={"limit": 0}), 422, "invalid_limit")
    assert_error(httpx.get(f"{api.url}/versions", params={"cursor": "abc"}), 422, "invalid_cursor")


def test_empty_commit(api: Api, name: str, unchanged: None) -> None:
    assert_error(api.commit(api.draft(model=name).json()["id"]), 422, "empty_version")


def test_unknown_draft(api: Api) -> None:
    assert_error(api.commit("00000000-0000-0000-0000-000000000000"), 404, "draft_not_found")


# --------------------------------------------------------------------------- content vs kind and base


def test_adapter_shape_mismatch_with_base(api: Api, name: str, base_ref: str, tmp_path: Path,
                                          unchanged: None) -> None:
    factors = lora_factors(Shape(hidden=32, intermediate=64), r=4)  # wrong hidden size
    folder = save_adapter(tmp_path / "a", factors, r=4)
    err = assert_error(api.push_folder(folder, model=name, base=base_ref), 422, "shape_mismatch")
    keys = {m["key"] for m in err["details"]["mismatches"]}
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert all(m["problem"] == "shape mismatch" for m in err["details"]["mismatches"])
    assert "model.layers.0.self_attn.q_proj.weight" in err["message"]


def test_adapter_targets_missing_module(api: Api, name: str, base_ref: str, tmp_path: Path, unchanged: None) -> None:
    factors = lora_factors(r=4)
    factors["base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight"] = torch.zeros(4, 64)
    factors["base_model.model.model.layers.0.self_attn.nope_proj.lora_B.weight"] = torch.zeros(64, 4)
    folder = save_adapter(tmp_path / "a", factors, r=4, targets=("q_proj", "v_proj", "nope_proj"))
    err = assert_error(api.push_folder(folder, model=name, base=base_ref), 422, "shape_mismatch")
    assert {"key": "model.layers.0.self_attn.nope_proj.weight", "problem": "no such tensor in the base",
            "adapter_shape": [64, 64]} in err["details"]["mismatches"]


def test_missing_adapter_config(api: Api, name: str, base_ref: str, tmp_path: Path, unchanged: None) -> None:
    folder = save_adapter(tmp_path / "a", lora_factors(r=4), r=4)
    (folder / "adapter_config.json").unlink()
    assert_error(api.push_folder(folder, model=name, base=base_ref, kind="adapter"), 422, "missing_adapter_config")


def test_adapter_without_base(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    folder = save_adapter(tmp_path / "a", lora_factors(r=4), r=4)
    assert_error(api.push_folder(folder, model=name), 422, "base_required")


@pytest.mark.parametrize("extra,code", [
    ({"use_dora": True}, "unsupported_adapter"),
    ({"bias": "all"}, "unsupported_adapter"),
    ({"modules_to_save": ["lm_head"]}, "unsupported_adapter"),
    ({"peft_type": "IA3"}, "unsupported_adapter"),
])
def test_unsupported_adapter_variants(api: Api, name: str, base_ref: str, tmp_path: Path, extra: dict[str, Any],
                                      code: str, unchanged: None) -> None:
    folder = save_adapter(tmp_path / "a", lora_factors(r=4), r=4, extra_config=extra)
    err = assert_error(api.push_folder(folder, model=name, base=base_ref), 422, code)
    assert "not supported" in err["message"]


def test_dora_magnitude_tensors(api: Api, name: str, base_ref: str, tmp_path: Path, unchanged: None) -> None:
    factors = lora_factors(r=4)
    factors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    err = assert_error(api.push_folder(save_adapter(tmp_path / "a", factors, r=4), model=name, base=base_ref), 422,
                       "unsupported_adapter")
    assert "DoRA" in err["message"]


def test_adapter_pinned_to_adapter(api: Api, server: Server, name: str, base_ref: str, tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "a", lora_factors(r=4), r=4)
    assert api.push_folder(folder, model=name + "-a", base=base_ref).status_code == 201
    assert_error(api.draft(model=name, base=f"{name}-a@1"), 422, "invalid_base")


def test_finetune_missing_tensors(api: Api, name: str, base_ref: str, tmp_path: Path, unchanged: None) -> None:
    weights = random_weights()
    del weights["lm_head.weight"]
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    err = assert_error(api.push_folder(save_checkpoint(tmp_path / "ft", weights), model=name, base=base_ref), 422,
                       "shape_mismatch")
    problems = {m["key"]: m["problem"] for m in err["details"]["mismatches"]}
    assert problems == {"lm_head.weight": "missing from the fine-tune",
                        "model.layers.0.mlp.up_proj.weight": "shape mismatch"}


def test_kind_mismatch(api: Api, name: str, base_ref: str, tmp_path: Path, unchanged: None) -> None:
    folder = save_adapter(tmp_path / "a", lora_factors(r=4), r=4)
    model = base_ref.split("@")[0]
    assert_error(api.push_folder(folder, model=model, base=base_ref, kind="adapter"), 409, "kind_mismatch")


def test_index_lists_missing_shard(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    folder = make_base(tmp_path / "s", seed=1, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    err = assert_error(api.push_folder(folder, model=name), 422, "invalid_index")
    assert err["details"]["missing"] == ["model-00002-of-00002.safetensors"]


def test_base_without_weights(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    assert_error(api.push_folder(tmp_path / "c", model=name), 422, "missing_weights")


def test_same_tensor_in_two_files(api: Api, name: str, tmp_path: Path, unchanged: None) -> None:
    folder = make_base(tmp_path / "b", seed=1)
    shutil.copy(folder / "model.safetensors", folder / "extra.safetensors")
    assert_error(api.push_folder(folder, model=name), 422, "duplicate_tensor")


def test_archive_base_that_adapters_pin(api: Api, server: Server, name: str, tmp_path: Path) -> None:
    base = api.push_folder(make_base(tmp_path / "b", seed=9), model=name).json()
    adapter = api.push_folder(save_adapter(tmp_path / "a", lora_factors(r=4), r=4), model=name + "-a",
                              base=base["ref"]).json()
    before = state(server)
    err = assert_error(httpx.delete(f"{api.url}/models/{name}/versions/1"), 409, "has_dependents")
    assert err["details"]["dependents"] == [adapter["ref"]]
    assert state(server) == before
    assert httpx.get(f"{api.url}/models/{name}/versions/1").json()["archived"] is False
    # once the adapter is archived, the base may go
    assert httpx.delete(f"{api.url}/models/{name}-a/versions/1").status_code == 200
    assert httpx.delete(f"{api.url}/models/{name}/versions/1").json()["archived"] is True
    # an archived base can no longer be pinned
    assert_error(api.draft(model=name + "-b", base=base["ref"]), 422, "unknown_base")


def test_alias_to_other_models_version(api: Api, server: Server, base_ref: str, name: str, tmp_path: Path) -> None:
    api.push_folder(make_base(tmp_path / "b", seed=77), model=name)
    r = httpx.put(f"{api.url}/models/{name}/aliases/prod", json={"version": base_ref})
    assert_error(r, 422, "invalid_alias_target")




# =========================================================================== the bad-input corpus
#
# Every case below goes through the push protocol (draft, PUT file, links, resumable uploads,
# commit) on the module's server (SQLite and PostgreSQL). A case's setup steps must succeed; its
# last request is the bad one and must get the expected 4xx with the JSON error body, within a
# client timeout, and leave no partial state: the counts of models, versions, blobs, draft files,
# tags and events unchanged, no new object in <home>/blobs/sha256, and no staging file under
# <home>/staging created or grown. Each outcome is recorded; set BAD_INPUT_REPORT=path to get
# the tally (tried / 4xx / 5xx / hangs / partial state) as JSON.

BODY_TIMEOUT = 2  # REGISTRY_BODY_TIMEOUT_SECONDS of this module's servers
CLIENT_TIMEOUT = 60.0
RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Server:
    """This module's servers refuse a stalled upload body after BODY_TIMEOUT seconds."""
    return make_server(request, tmp_path_factory, pg_databases, request.param,
                       REGISTRY_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT))


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    tally: dict[str, Any] = {"tried": len(RESULTS)}
    for outcome in ("4xx", "5xx", "hang", "partial_state", "unexpected_answer"):
        tally[outcome] = sum(1 for r in RESULTS if outcome in r["outcomes"])
    tally["clean_4xx"] = sum(1 for r in RESULTS if r["outcomes"] == ["4xx"])
    backends = sorted({r["backend"] for r in RESULTS})
    tally["by_backend"] = {b: sum(1 for r in RESULTS if r["backend"] == b) for b in backends}
    tally["failures"] = [r for r in RESULTS if r["outcomes"] != ["4xx"]]
    print("\nbad-input corpus:", json.dumps({k: v for k, v in tally.items() if k != "failures"}))
    if os.environ.get("BAD_INPUT_REPORT"):
        Path(os.environ["BAD_INPUT_REPORT"]).write_text(json.dumps(tally, indent=2))


_ENGINES: dict[str, Any] = {}
_TABLES = ("models", "model_versions", "blobs", "drafts", "draft_files", "version_tags", "model_tags", "aliases",
           "lineage_edges", "events")


def snapshot(server: Server) -> dict[str, Any]:
    engine = _ENGINES.get(server.database_url)
    if engine is None:
        engine = _ENGINES[server.database_url] = create_engine(server.database_url)
    with engine.connect() as c:
        counts = {t: c.execute(text(f"select count(*) from {t}")).scalar_one() for t in _TABLES}
        counts["upload_sessions"] = c.execute(text("select count(*) from upload_sessions")).scalar_one()
    staging = server.home / "staging"
    files = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()} \
        if staging.exists() else {}
    return {"counts": counts, "blobs": frozenset(server.blob_files()), "staging": files}


def leftovers(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What the bad request left behind (empty: nothing)."""
    out = [f"{t}: {before['counts'][t]} -> {after['counts'][t]}" for t in _TABLES
           if before["counts"][t] != after["counts"][t]]
    if after["counts"]["upload_sessions"] > before["counts"]["upload_sessions"]:
        out.append("a new upload session")
    if after["blobs"] != before["blobs"]:
        out.append(f"store objects: {sorted(after['blobs'] ^ before['blobs'])[:3]}")
    for path, size in after["staging"].items():
        if path not in before["staging"]:
            out.append(f"new staging file {path} ({size} bytes)")
        elif size > before["staging"][path]:
            out.append(f"staging file {path} grew {before['staging'][path]} -> {size}")
    return out


class C:
    """What a case gets: an HTTP client on the server, helpers for the push protocol, and
    ``mark()`` to say "the next request is the bad one" (state is compared from there)."""

    def __init__(self, server: Server, base_ref: str, tiny_ref: str) -> None:
        self.server = server
        self.url = server.url + "/api/v1"
        self.http = httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT)
        self.base_ref = base_ref
        self.tiny_ref = tiny_ref
        self.name = f"c-{uuid.uuid4().hex[:10]}"
        self.before: dict[str, Any] | None = None

    def mark(self) -> None:
        self.before = snapshot(self.server)

    def ok(self, r: httpx.Response) -> dict[str, Any]:
        assert r.status_code < 300, f"setup step failed: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else {}  # type: ignore[no-any-return]

    def draft(self, **spec: Any) -> str:
        return str(self.ok(self.http.post("/drafts", json={"model": self.name, **spec}))["id"])

    def put(self, draft_id: str, path: str, content: bytes, **headers: str) -> httpx.Response:
        return self.http.put(f"/drafts/{draft_id}/files/{path}", content=content, headers=headers)

    def upload(self, draft_id: str, path: str, size: int | None = None) -> str:
        body: dict[str, Any] = {"path": path} if size is None else {"path": path, "size": size}
        return str(self.ok(self.http.post(f"/drafts/{draft_id}/uploads", json=body))["id"])

    def patch(self, upload_id: str, offset: str, content: bytes) -> httpx.Response:
        return self.http.patch(f"/uploads/{upload_id}", content=content, headers={"Upload-Offset": offset})

    def files_then_commit(self, files: dict[str, bytes], **spec: Any) -> httpx.Response:
        d = self.draft(**spec)
        for path, content in files.items():
            self.ok(self.put(d, path, content))
        self.mark()
        return self.http.post(f"/drafts/{d}/commit")

    def raw(self, head: str, body: bytes = b"", *, wait: float = 30.0) -> httpx.Response:
        """Send ``head`` (request line + headers, no blank line) and ``body`` on a raw socket,
        then read the answer (the body may be shorter than the declared length: a stalled client)."""
        host, port = self.server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=wait) as s:
            s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
            data = b""
            try:
                while b"\r\n\r\n" not in data or len(data) < _expected_len(data):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except TimeoutError:
                raise httpx.ReadTimeout(f"no answer within {wait} s") from None
        head_bytes, _, content = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(x.split(":", 1)) for x in lines[1:] if ":" in x]
        return httpx.Response(status, headers=[(k.strip(), v.strip()) for k, v in headers], content=content)


def _expected_len(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        return 1 << 62
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(head) + 4 + int(v.strip())
    return 1 << 62


@dataclass
class Case:
    id: str
    run: Callable[[C], httpx.Response]
    status: int
    code: str


# --------------------------------------------------------------------------- case builders


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
_Q = "base_model.model.model.layers.0.self_attn.q_proj"


def st(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


_CACHE: dict[str, Any] = {}


def tmpdir() -> Path:
    if "tmp" not in _CACHE:
        import tempfile

        _CACHE["tmp"] = tempfile.TemporaryDirectory(prefix="bad-input-")
    return Path(_CACHE["tmp"].name) / uuid.uuid4().hex


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter(r: int = 4, extra_config: dict[str, Any] | None = None,
            edit: Callable[[dict[str, Any]], None] | None = None,
            config: Callable[[dict[str, Any]], Any] | None = None, shape: Shape = Shape()) -> dict[str, bytes]:
    """A PEFT adapter for the module's base (``edit`` changes the factors, ``config`` the config)."""
    factors = lora_factors(shape, r=r)
    if edit is not None:
        edit(factors)
    files = folder_files(save_adapter(tmpdir(), factors, r=r, extra_config=extra_config))
    if config is not None:
        cfg = json.loads(files["adapter_config.json"])
        out = config(cfg)
        files["adapter_config.json"] = out if isinstance(out, bytes) else json.dumps(cfg).encode()
    return files


TINY = Shape(vocab=16, hidden=8, intermediate=16, layers=1)


def tiny(edit: Callable[[dict[str, Any]], None] | None = None, shards: int = 1) -> dict[str, bytes]:
    weights = random_weights(TINY, seed=5)
    if edit is not None:
        edit(weights)
    return folder_files(save_checkpoint(tmpdir(), weights, TINY, shards=shards))


def put_case(cid: str, path: str, content: bytes | Callable[[], bytes], code: str, status: int = 422,
             kind: str | None = None, pinned: bool = False, **headers: str) -> Case:
    def run(c: C) -> httpx.Response:
        spec: dict[str, Any] = {} if kind is None else {"kind": kind}
        if pinned:
            spec["base"] = c.base_ref
        d = c.draft(**spec)
        data = content() if callable(content) else content
        c.mark()
        return c.put(d, path, data, **headers)
    return Case(cid, run, status, code)


def draft_case(cid: str, status: int, code: str, **spec: Any) -> Case:
    def run(c: C) -> httpx.Response:
        body = {"model": c.name, **{k: (v(c) if callable(v) else v) for k, v in spec.items()}}
        c.mark()
        return c.http.post("/drafts", json=body)
    return Case(cid, run, status, code)


def commit_case(cid: str, files: Callable[[], dict[str, bytes]], code: str, status: int = 422,
                pinned: str | None = None, **spec: Any) -> Case:
    def run(c: C) -> httpx.Response:
        if pinned is not None:
            spec["base"] = c.base_ref if pinned == "base" else c.tiny_ref
        return c.files_then_commit(files(), **spec)
    return Case(cid, run, status, code)


def ref_case(cid: str, ref: Callable[[C], str], status: int, code: str) -> Case:
    return draft_case(cid, status, code, base=ref)


def model_of(c: C) -> str:
    return c.base_ref.split("@")[0]


# --------------------------------------------------------------------------- the cases

CASES: list[Case] = []

# Names, aliases, tags, kinds and refs in the draft (checked before any byte moves).
CASES += [
    Case("name-trailing-newline", lambda c: (c.mark(), c.http.post("/drafts", json={"model": "demo-base\n"}))[1],
         422, "invalid_name"),
    Case("name-empty", lambda c: (c.mark(), c.http.post("/drafts", json={"model": ""}))[1], 422, "invalid_name"),
    Case("name-slash", lambda c: (c.mark(), c.http.post("/drafts", json={"model": "a/b"}))[1], 422, "invalid_name"),
    Case("name-fullwidth", lambda c: (c.mark(), c.http.post("/drafts", json={"model": "ｄemo"}))[1], 422,
         "invalid_name"),
    Case("name-nul", lambda c: (c.mark(), c.http.post("/drafts", json={"model": "a\x00b"}))[1], 422, "invalid_name"),
    Case("name-too-long", lambda c: (c.mark(), c.http.post("/drafts", json={"model": "a" * 129}))[1], 422,
         "invalid_name"),
    Case("name-not-string", lambda c: (c.mark(), c.http.post("/drafts", json={"model": 7}))[1], 422,
         "invalid_request"),
    draft_case("alias-trailing-newline", 422, "invalid_alias", aliases=["prod\n"]),
    draft_case("alias-digits", 422, "invalid_alias", aliases=["1"]),
    draft_case("alias-latest", 422, "invalid_alias", aliases=["latest"]),
    draft_case("alias-too-long", 422, "invalid_alias", aliases=["a" * 65]),
    draft_case("tag-key-trailing-newline", 422, "invalid_tag", tags={"stage\n": "dev"}),
    draft_case("tag-key-space", 422, "invalid_tag", tags={"a b": "v"}),
    draft_case("tag-key-empty", 422, "invalid_tag", tags={"": "v"}),
    draft_case("tag-value-too-long", 422, "invalid_tag", tags={"k": "v" * 1025}),
    draft_case("tag-value-not-string", 422, "invalid_request", tags={"k": 1}),
    draft_case("tags-not-object", 422, "invalid_request", tags=["a"]),
    draft_case("too-many-tags", 422, "too_many_tags", tags={f"k{i}": "v" for i in range(257)}),
    draft_case("tags-too-large", 422, "tags_too_large", tags={f"k{i}": "v" * 1000 for i in range(100)}),
    draft_case("kind-unknown", 422, "invalid_kind", kind="checkpoint"),
    draft_case("kind-case", 422, "invalid_kind", kind="Base"),
    draft_case("description-too-long", 422, "invalid_description", description="d" * 10_001),
    draft_case("parent-unknown", 422, "unknown_parent", parents=[{"ref": "no-such-model@1"}]),
    draft_case("parent-bad-ref", 422, "invalid_ref", parents=[{"ref": "a@@b"}]),
    draft_case("parent-bad-relation", 422, "invalid_relation", parents=[{"ref": "x@1", "relation": "sibling_of"}]),
    draft_case("parent-no-ref", 422, "invalid_request", parents=[{"relation": "merge_of"}]),
    draft_case("parent-unicode-version", 422, "invalid_ref", parents=lambda c: [{"ref": model_of(c) + "@١"}]),
    ref_case("base-superscript-version", lambda c: model_of(c) + "@²", 422, "invalid_ref"),
    ref_case("base-arabic-indic-version", lambda c: model_of(c) + "@١", 422, "invalid_ref"),
    ref_case("base-fullwidth-version", lambda c: model_of(c) + "@１", 422, "invalid_ref"),
    ref_case("base-underscore-version", lambda c: model_of(c) + "@1_0", 422, "invalid_ref"),
    ref_case("base-plus-version", lambda c: model_of(c) + "@+1", 422, "invalid_ref"),
    ref_case("base-zero-version", lambda c: model_of(c) + "@0", 422, "invalid_ref"),
    ref_case("base-huge-version", lambda c: model_of(c) + "@9999999999", 422, "invalid_ref"),
    ref_case("base-name-newline", lambda c: model_of(c) + "\n@1", 422, "invalid_ref"),
    ref_case("base-alias-newline", lambda c: model_of(c) + "@prod\n", 422, "invalid_ref"),
    ref_case("base-double-at", lambda c: model_of(c) + "@@1", 422, "invalid_ref"),
    ref_case("base-unknown-model", lambda c: "no-such-model@1", 422, "unknown_base"),
    ref_case("base-unknown-version", lambda c: model_of(c) + "@99", 422, "unknown_base"),
    ref_case("base-unknown-alias", lambda c: model_of(c) + "@nosuchalias", 422, "unknown_base"),
    Case("kind-mismatch-existing-model",
         lambda c: (c.mark(), c.http.post("/drafts", json={"model": model_of(c), "kind": "adapter",
                                                             "base": c.base_ref}))[1], 409, "kind_mismatch"),
]

# Request bodies of JSON endpoints.
CASES += [
    Case("body-not-json", lambda c: (c.mark(), c.http.post("/drafts", content=b"{not json",
                                                          headers={"Content-Type": "application/json"}))[1],
         422, "invalid_request"),
    Case("body-json-array", lambda c: (c.mark(), c.http.post("/drafts", json=[1, 2]))[1], 422, "invalid_request"),
    Case("body-nested-200k", lambda c: (c.mark(), c.http.post("/drafts", content=deep(200_000),
                                                             headers={"Content-Type": "application/json"}))[1],
         400, "bad_request"),
    Case("body-over-limit", lambda c: (c.mark(), c.http.post("/drafts", json={"model": c.name,
                                                                            "description": "d" * (1 << 20)}))[1],
         413, "payload_too_large"),
    Case("body-over-limit-chunked",
         lambda c: (c.mark(), c.http.post("/drafts", content=iter([b'{"model": "x", "description": "'] +
                                                                  [b"d" * 65536] * 20 + [b'"}']),
                                          headers={"Content-Type": "application/json"}))[1],
         413, "payload_too_large"),
    Case("body-declared-101MB",
         lambda c: (c.mark(), c.raw(f"POST /api/v1/drafts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    f"Content-Length: {101 << 20}", b'{"model": '))[1],
         413, "payload_too_large"),
    Case("links-body-over-limit", lambda c: (lambda d: (c.mark(), c.http.post(
        f"/drafts/{d}/links", json={"path": "x" * (1 << 20), "sha256": "0" * 64}))[1])(c.draft()),
         413, "payload_too_large"),
]

# safetensors files, refused as they arrive.
_valid_header = {"a": F32_1}
CASES += [
    put_case("st-empty", "model.safetensors", b"", "invalid_safetensors"),
    put_case("st-3-bytes", "model.safetensors", b"\x01\x02\x03", "invalid_safetensors"),
    put_case("st-truncated-data", "model.safetensors", st(_valid_header, b"\0\0"), "invalid_safetensors"),
    put_case("st-truncated-header", "model.safetensors", st(_valid_header)[:20], "invalid_safetensors"),
    put_case("st-header-longer-than-file", "model.safetensors", st(b"{}", b"", length=1000), "invalid_safetensors"),
    put_case("st-header-length-2^63", "model.safetensors", st(b"{}", length=1 << 63), "header_too_large"),
    put_case("st-header-length-limit+1", "model.safetensors", st(b"{}", length=(16 << 20) + 1), "header_too_large"),
    put_case("st-header-length-1", "model.safetensors", st(b"{", length=1), "invalid_safetensors"),
    put_case("st-header-garbage", "model.safetensors", st(b"\x89PNG\r\n\x1a\n garbage"), "invalid_safetensors"),
    put_case("st-header-not-utf8", "model.safetensors", st(b'{"\xff\xfe": 1}'), "invalid_safetensors"),
    put_case("st-header-unterminated", "model.safetensors", st(b'{"a": {"dtype": "F32"'), "invalid_safetensors"),
    put_case("st-header-array", "model.safetensors", st(b"[]"), "invalid_safetensors"),
    put_case("st-header-string", "model.safetensors", st(b'"x"'), "invalid_safetensors"),
    put_case("st-header-nul-padding", "model.safetensors", st(b'{"a": 1}\0\0\0'), "invalid_safetensors"),
    put_case("st-entry-not-object", "model.safetensors", st({"a": 1}), "invalid_safetensors"),
    put_case("st-entry-missing-dtype", "model.safetensors",
             st({"a": {"shape": [1], "data_offsets": [0, 4]}}, _f32(1)), "invalid_safetensors"),
    put_case("st-entry-extra-key", "model.safetensors", st({"a": {**F32_1, "x": 1}}, _f32(1)), "invalid_safetensors"),
    put_case("st-unknown-dtype", "model.safetensors", st({"a": {**F32_1, "dtype": "F128"}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-lowercase-dtype", "model.safetensors", st({"a": {**F32_1, "dtype": "f32"}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-string", "model.safetensors", st({"a": {**F32_1, "shape": "1"}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-negative", "model.safetensors", st({"a": {**F32_1, "shape": [-1]}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-float", "model.safetensors", st({"a": {**F32_1, "shape": [1.0]}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-bool", "model.safetensors", st({"a": {**F32_1, "shape": [True]}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-17-dims", "model.safetensors", st({"a": {**F32_1, "shape": [1] * 17}}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-0x1e30", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}, "b": F32_1}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-1e30x0", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [10**30, 0], "data_offsets": [0, 0]}, "b": F32_1}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-overflow-then-0", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}, "b": F32_1}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-shape-float-1e30", "model.safetensors",
             st(b'{"a": {"dtype": "F32", "shape": [0, 1e30], "data_offsets": [0, 0]}}'), "invalid_safetensors"),
    put_case("st-span-disagrees-with-shape", "model.safetensors",
             st({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), "invalid_safetensors"),
    put_case("st-offsets-overlap", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "invalid_safetensors"),
    put_case("st-offsets-gap", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "invalid_safetensors"),
    put_case("st-offsets-not-from-zero", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "invalid_safetensors"),
    put_case("st-offsets-reversed", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4), "invalid_safetensors"),
    put_case("st-offsets-past-end", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "invalid_safetensors"),
    put_case("st-offsets-negative", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4), "invalid_safetensors"),
    put_case("st-offsets-three", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 4), "invalid_safetensors"),
    put_case("st-offsets-strings", "model.safetensors",
             st({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4), "invalid_safetensors"),
    put_case("st-trailing-bytes", "model.safetensors", st(_valid_header, _f32(1) + b"\0" * 4), "invalid_safetensors"),
    put_case("st-duplicate-keys", "model.safetensors",
             st(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', _f32(1)), "invalid_safetensors"),
    put_case("st-metadata-not-strings", "model.safetensors", st({"__metadata__": {"a": 1}, "a": F32_1}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-metadata-list", "model.safetensors", st({"__metadata__": ["a"], "a": F32_1}, _f32(1)),
             "invalid_safetensors"),
    put_case("st-empty-tensor-name", "model.safetensors", st({"": F32_1}, _f32(1)), "invalid_safetensors"),
    put_case("st-deep-json-100k", "model.safetensors",
             lambda: st(b'{"__metadata__": {"x": "y"}, "a": ' + deep(100_000) + b"}", _f32(1)), "invalid_safetensors"),
    put_case("st-deep-json-200k", "model.safetensors", lambda: st(deep(200_000)), "invalid_safetensors"),
    put_case("st-deep-json-in-metadata", "model.safetensors",
             lambda: st(b'{"__metadata__": ' + b'{"a": ' * 50_000 + b'"x"' + b"}" * 50_000 + b"}"),
             "invalid_safetensors"),
    put_case("st-nan-f32", "model.safetensors", st(_valid_header, _f32(float("nan"))), "non_finite"),
    put_case("st-inf-f32", "model.safetensors", st(_valid_header, _f32(float("inf"))), "non_finite"),
    put_case("st-neg-inf-f16", "model.safetensors",
             st({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\x00\x00\x00\xfc"), "non_finite"),
    put_case("st-nan-bf16", "model.safetensors",
             st({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\x00\x00\xc0\x7f"), "non_finite"),
    put_case("st-nan-f64", "model.safetensors",
             st({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, struct.pack("<d", float("nan"))),
             "non_finite"),
    put_case("st-nan-in-sharded-name", "model-00001-of-00002.safetensors", st(_valid_header, _f32(float("nan"))),
             "non_finite"),
    put_case("st-nan-in-adapter", "adapter_model.safetensors",
             lambda: adapter(edit=lambda f: [t.fill_(float("nan")) for k, t in f.items() if k.startswith(_Q)])
             ["adapter_model.safetensors"], "non_finite", kind="adapter", pinned=True),
    put_case("st-inf-in-adapter-lora-b", "adapter_model.safetensors",
             lambda: adapter(edit=lambda f: [t.fill_(float("inf")) for k, t in f.items() if "lora_B" in k])
             ["adapter_model.safetensors"], "non_finite", kind="adapter", pinned=True),
    put_case("pickle-bin", "pytorch_model.bin", b"\x80\x04K\x01.", "unsafe_format"),
    put_case("pickle-pt", "model.pt", b"\x80\x04K\x01.", "unsafe_format"),
    put_case("pickle-ckpt", "weights/model.ckpt", b"\x80\x04K\x01.", "unsafe_format"),
    put_case("pickle-uppercase", "MODEL.PKL", b"\x80\x04K\x01.", "unsafe_format"),
    put_case("adapter-config-not-json", "adapter_config.json", b"{r: 8", "invalid_json"),
    put_case("adapter-config-not-utf8", "adapter_config.json", b'{"r": "\xff"}', "invalid_json"),
    put_case("adapter-config-deep-150k", "adapter_config.json", lambda: b'{"x": ' + deep(150_000) + b"}",
             "invalid_json"),
    put_case("index-deep-100k", "model.safetensors.index.json", lambda: b'{"weight_map": ' + deep(100_000) + b"}",
             "invalid_json"),
    put_case("index-not-json", "model.safetensors.index.json", b"weight_map", "invalid_json"),
    put_case("adapter-config-70-deep", "adapter_config.json", b'{"r": 4, "x": ' + deep(70) + b"}", "invalid_json"),
    put_case("nested-adapter-config-deep", "sub/adapter_config.json", lambda: deep(120_000), "invalid_json"),
]

# Paths, checksums and drafts of PUT.
_sha_other = hashlib.sha256(b"other").hexdigest()
CASES += [
    put_case("path-dotdot-encoded", "%2E%2E/%2E%2E/escape.json", b"{}", "unsafe_path"),
    put_case("path-dot-segment", "a/%2E/b.json", b"{}", "unsafe_path"),
    put_case("path-double-slash", "a//b.json", b"{}", "unsafe_path"),
    put_case("path-absolute", "/etc/passwd", b"{}", "unsafe_path"),
    put_case("path-backslash", "a%5Cb.json", b"{}", "unsafe_path"),
    put_case("path-nul", "a%00b.json", b"{}", "unsafe_path"),
    put_case("path-control", "a%01b.json", b"{}", "unsafe_path"),
    put_case("path-newline", "a%0A.json", b"{}", "not_found", 404),  # the route's {path:path} stops at "\n"
    put_case("path-trailing-slash", "dir/", b"{}", "unsafe_path"),
    put_case("path-colon", "c:x.json", b"{}", "unsafe_path"),
    put_case("path-too-long", "a/" * 520 + "x", b"{}", "unsafe_path"),
    put_case("path-segment-too-long", "a" * 256, b"{}", "unsafe_path"),
    put_case("path-not-nfc", "e%CC%81.json", b"{}", "unsafe_path"),
    put_case("path-bidi-override", "a%E2%80%AEnosj.txt", b"{}", "unsafe_path"),
    put_case("checksum-wrong", "x.json", b"{}", "checksum_mismatch", 400, **{"X-Checksum-Sha256": _sha_other}),
    put_case("checksum-not-hex", "x.json", b"{}", "invalid_sha256", 400, **{"X-Checksum-Sha256": "zz" * 32}),
    put_case("checksum-short", "x.json", b"{}", "invalid_sha256", 400, **{"X-Checksum-Sha256": "ab" * 31}),
    put_case("checksum-long", "x.json", b"{}", "invalid_sha256", 400, **{"X-Checksum-Sha256": "ab" * 33}),
    put_case("checksum-unicode-digits", "x.json", b"{}", "invalid_sha256", 400,
             **{"X-Checksum-Sha256": "0" * 63 + "g"}),
    Case("put-unknown-draft", lambda c: (c.mark(), c.put("00000000-0000-0000-0000-000000000000", "x.json", b"{}"))[1],
         404, "draft_not_found"),
    Case("put-declared-over-file-limit", lambda c: (lambda d: (c.mark(), c.raw(
        f"PUT /api/v1/drafts/{d}/files/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {(1 << 40) + 1}"))[1])(c.draft()),
         413, "payload_too_large"),
    Case("put-stalled-body", lambda c: (lambda d: (c.mark(), c.raw(
        f"PUT /api/v1/drafts/{d}/files/stall.json HTTP/1.1\r\nHost: x\r\nContent-Length: 100000",
        b"x" * 40, wait=BODY_TIMEOUT + 30))[1])(c.draft()), 408, "body_timeout"),
    Case("put-stalled-safetensors", lambda c: (lambda d: (c.mark(), c.raw(
        f"PUT /api/v1/drafts/{d}/files/m.safetensors HTTP/1.1\r\nHost: x\r\nContent-Length: 100000",
        st(_valid_header, b""), wait=BODY_TIMEOUT + 30))[1])(c.draft()), 408, "body_timeout"),
]


def _link(c: C, body: dict[str, Any], draft: str | None = None) -> httpx.Response:
    d = draft or c.draft()
    c.mark()
    return c.http.post(f"/drafts/{d}/links", json=body)


def _stored_sha(c: C) -> tuple[str, int]:
    files = c.ok(c.http.get(f"/models/{model_of(c)}/versions/1/files"))
    f = next(f for f in files if f["path"] == "model.safetensors")
    return f["sha256"], f["size"]


# Links (deduplicated files).
CASES += [
    Case("link-unknown-blob", lambda c: _link(c, {"path": "x.json", "sha256": "1" * 64}), 404, "blob_not_found"),
    Case("link-sha-not-hex", lambda c: _link(c, {"path": "x.json", "sha256": "z" * 64}), 400, "invalid_sha256"),
    Case("link-sha-trailing-newline", lambda c: _link(c, {"path": "x.json", "sha256": "1" * 64 + "\n"}), 400,
         "invalid_sha256"),
    Case("link-sha-short", lambda c: _link(c, {"path": "x.json", "sha256": "1" * 10}), 400, "invalid_sha256"),
    Case("link-sha-missing", lambda c: _link(c, {"path": "x.json"}), 422, "invalid_request"),
    Case("link-size-mismatch", lambda c: (lambda s: _link(c, {"path": "m.safetensors", "sha256": s[0],
                                                             "size": s[1] + 1}))(_stored_sha(c)), 404,
         "blob_not_found"),
    Case("link-unsafe-path", lambda c: (lambda s: _link(c, {"path": "../m.safetensors", "sha256": s[0]}))(
        _stored_sha(c)), 422, "unsafe_path"),
    Case("link-unknown-draft", lambda c: (lambda s: _link(c, {"path": "m.safetensors", "sha256": s[0]},
                                                         "00000000-0000-0000-0000-000000000000"))(_stored_sha(c)),
         404, "draft_not_found"),
]


def _upload_then(c: C, path: str, size: int | None, step: Callable[[str, str], httpx.Response],
                 first: bytes | None = None) -> httpx.Response:
    d = c.draft()
    u = c.upload(d, path, size)
    if first is not None:
        c.ok(c.patch(u, "0", first))
    c.mark()
    return step(d, u)


_st_ok = st(_valid_header, _f32(1.0))
_st_ok_sha = hashlib.sha256(_st_ok).hexdigest()

# Resumable upload sessions.
CASES += [
    Case("upload-create-unsafe-path", lambda c: (lambda d: (c.mark(), c.http.post(
        f"/drafts/{d}/uploads", json={"path": "../x"}))[1])(c.draft()), 422, "unsafe_path"),
    Case("upload-create-negative-size", lambda c: (lambda d: (c.mark(), c.http.post(
        f"/drafts/{d}/uploads", json={"path": "x.bin.json", "size": -1}))[1])(c.draft()), 413, "payload_too_large"),
    Case("upload-create-too-large", lambda c: (lambda d: (c.mark(), c.http.post(
        f"/drafts/{d}/uploads", json={"path": "x.json", "size": (1 << 40) + 1}))[1])(c.draft()),
         413, "payload_too_large"),
    Case("upload-create-unknown-draft", lambda c: (c.mark(), c.http.post(
        "/drafts/00000000-0000-0000-0000-000000000000/uploads", json={"path": "x.json"}))[1], 404, "draft_not_found"),
    Case("upload-patch-wrong-offset", lambda c: _upload_then(c, "m.safetensors", None,
                                                             lambda d, u: c.patch(u, "5", _st_ok)), 409,
         "offset_mismatch"),
    Case("upload-patch-offset-behind", lambda c: _upload_then(c, "m.safetensors", None,
                                                              lambda d, u: c.patch(u, "0", _st_ok[20:]),
                                                              first=_st_ok[:20]), 409, "offset_mismatch"),
    Case("upload-patch-offset-underscore", lambda c: _upload_then(c, "m.safetensors", None,
                                                                  lambda d, u: c.patch(u, "0_0", _st_ok)), 400,
         "invalid_offset"),
    Case("upload-patch-offset-arabic-digit", lambda c: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.http.patch(f"/uploads/{u}", content=_st_ok,
                                                            headers={"Upload-Offset": "٠".encode()})), 400,
         "invalid_offset"),
    Case("upload-patch-offset-negative", lambda c: _upload_then(c, "m.safetensors", None,
                                                                lambda d, u: c.patch(u, "-1", _st_ok)), 400,
         "invalid_offset"),
    Case("upload-patch-offset-plus", lambda c: _upload_then(c, "m.safetensors", None,
                                                            lambda d, u: c.patch(u, "+0", _st_ok)), 400,
         "invalid_offset"),
    Case("upload-patch-offset-missing", lambda c: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.http.patch(f"/uploads/{u}", content=_st_ok)), 422, "invalid_request"),
    Case("upload-patch-past-declared-size", lambda c: _upload_then(c, "m.safetensors", 10,
                                                                   lambda d, u: c.patch(u, "0", _st_ok)), 413,
         "payload_too_large"),
    Case("upload-patch-unknown", lambda c: (c.mark(), c.patch("00000000-0000-0000-0000-000000000000", "0", b"x"))[1],
         404, "upload_not_found"),
    Case("upload-patch-bad-header", lambda c: _upload_then(c, "m.safetensors", None,
                                                           lambda d, u: c.patch(u, "0", st(b"[1]", b""))), 422,
         "invalid_safetensors"),
    Case("upload-patch-huge-header-length", lambda c: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.patch(u, "0", st(b"{}", length=1 << 62))),
         422, "header_too_large"),
    Case("upload-patch-stalled", lambda c: _upload_then(c, "m.safetensors", None, lambda d, u: c.raw(
        f"PATCH /api/v1/uploads/{u} HTTP/1.1\r\nHost: x\r\nUpload-Offset: 0\r\nContent-Length: 100000",
        b"x" * 40, wait=BODY_TIMEOUT + 30)), 408, "body_timeout"),
    Case("upload-commit-wrong-sha", lambda c: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.http.post(f"/uploads/{u}/commit", json={"sha256": _sha_other}),
        first=_st_ok), 400, "checksum_mismatch"),
    Case("upload-commit-bad-sha", lambda c: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.http.post(f"/uploads/{u}/commit", json={"sha256": "xyz"}),
        first=_st_ok), 400, "invalid_sha256"),
    Case("upload-commit-incomplete", lambda c: _upload_then(
        c, "m.safetensors", len(_st_ok) + 10, lambda d, u: c.http.post(f"/uploads/{u}/commit",
                                                                       json={"sha256": _st_ok_sha}),
        first=_st_ok), 409, "upload_incomplete"),
    Case("upload-commit-truncated-safetensors", lambda c: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.http.post(
            f"/uploads/{u}/commit", json={"sha256": hashlib.sha256(_st_ok[:-2]).hexdigest()}),
        first=_st_ok[:-2]), 422, "invalid_safetensors"),
    Case("upload-commit-nan", lambda c: (lambda data: _upload_then(
        c, "m.safetensors", None, lambda d, u: c.http.post(f"/uploads/{u}/commit",
                                                           json={"sha256": hashlib.sha256(data).hexdigest()}),
        first=data))(st(_valid_header, _f32(float("nan")))), 422, "non_finite"),
    Case("upload-commit-pickle", lambda c: _upload_then(
        c, "model.pt", None, lambda d, u: c.http.post(f"/uploads/{u}/commit",
                                                      json={"sha256": hashlib.sha256(b"\x80\x04.").hexdigest()}),
        first=b"\x80\x04."), 422, "unsafe_format"),
    Case("upload-commit-deep-json", lambda c: (lambda data: _upload_then(
        c, "adapter_config.json", None, lambda d, u: c.http.post(f"/uploads/{u}/commit",
                                                                 json={"sha256": hashlib.sha256(data).hexdigest()}),
        first=data))(deep(100_000)), 422, "invalid_json"),
    Case("upload-commit-unknown", lambda c: (c.mark(), c.http.post(
        "/uploads/00000000-0000-0000-0000-000000000000/commit", json={"sha256": _st_ok_sha}))[1], 404,
         "upload_not_found"),
]


def _del(d: dict[str, Any], key: str) -> None:
    del d[key]


def _set(**kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(kv)



# Whole versions at commit: adapters, fine-tunes, sharded checkpoints, duplicates.
CASES += [
    commit_case("commit-empty", dict, "empty_version"),
    Case("commit-unknown-draft", lambda c: (c.mark(), c.http.post("/drafts/00000000-0000-0000-0000-000000000000/"
                                                                  "commit"))[1], 404, "draft_not_found"),
    commit_case("adapter-without-base", lambda: adapter(), "base_required"),
    commit_case("adapter-without-config", lambda: {"adapter_model.safetensors": adapter()["adapter_model.safetensors"]},
                "missing_adapter_config", pinned="base", kind="adapter"),
    commit_case("adapter-without-weights", lambda: {"adapter_config.json": adapter()["adapter_config.json"]},
                "missing_weights", pinned="base"),
    commit_case("adapter-two-configs", lambda: {**adapter(), "b/adapter_config.json": adapter()["adapter_config.json"]},
                "invalid_adapter", pinned="base"),
    commit_case("adapter-config-missing-r", lambda: adapter(config=lambda c: _del(c, "r")), "invalid_adapter",
                pinned="base"),
    commit_case("adapter-config-r-0", lambda: adapter(config=_set(r=0)), "invalid_adapter", pinned="base"),
    commit_case("adapter-config-r-negative", lambda: adapter(config=_set(r=-4)), "invalid_adapter", pinned="base"),
    commit_case("adapter-config-r-float", lambda: adapter(config=_set(r=4.5)), "invalid_adapter", pinned="base"),
    commit_case("adapter-config-r-string", lambda: adapter(config=_set(r="4")), "invalid_adapter", pinned="base"),
    commit_case("adapter-config-r-bool", lambda: adapter(config=_set(r=True)), "invalid_adapter", pinned="base"),
    commit_case("adapter-config-r-disagrees", lambda: adapter(config=_set(r=8)), "invalid_adapter", pinned="base"),
    commit_case("adapter-config-alpha-string", lambda: adapter(config=_set(lora_alpha="16")), "invalid_adapter",
                pinned="base"),
    commit_case("adapter-config-no-peft-type", lambda: adapter(config=lambda c: _del(c, "peft_type")),
                "invalid_adapter", pinned="base"),
    commit_case("adapter-config-peft-type-ia3", lambda: adapter(config=_set(peft_type="IA3")), "unsupported_adapter",
                pinned="base"),
    commit_case("adapter-config-peft-type-prefix", lambda: adapter(config=_set(peft_type="PREFIX_TUNING")),
                "unsupported_adapter", pinned="base"),
    commit_case("adapter-config-dora", lambda: adapter(config=_set(use_dora=True)), "unsupported_adapter",
                pinned="base"),
    commit_case("adapter-config-lora-bias", lambda: adapter(config=_set(lora_bias=True)), "unsupported_adapter",
                pinned="base"),
    commit_case("adapter-config-bias-all", lambda: adapter(config=_set(bias="all")), "unsupported_adapter",
                pinned="base"),
    commit_case("adapter-config-modules-to-save", lambda: adapter(config=_set(modules_to_save=["lm_head"])),
                "unsupported_adapter", pinned="base"),
    commit_case("adapter-config-pissa-init", lambda: adapter(config=_set(init_lora_weights="pissa")),
                "unsupported_adapter", pinned="base"),
    commit_case("adapter-config-qalora", lambda: adapter(config=_set(use_qalora=True)), "unsupported_adapter",
                pinned="base"),
    commit_case("adapter-config-target-mismatch", lambda: adapter(config=_set(target_modules=["k_proj"])),
                "invalid_adapter", pinned="base"),
    commit_case("adapter-config-array", lambda: adapter(config=lambda c: b"[1, 2]"), "invalid_adapter",
                pinned="base"),
    commit_case("adapter-rank-a-b-differ", lambda: adapter(edit=lambda f: f.__setitem__(
        _Q + ".lora_B.weight", torch.zeros(64, 3))), "invalid_adapter", pinned="base"),
    commit_case("adapter-missing-lora-b", lambda: adapter(edit=lambda f: _del(f, _Q + ".lora_B.weight")),
                "invalid_adapter", pinned="base"),
    commit_case("adapter-full-weight-inside", lambda: adapter(edit=lambda f: f.__setitem__(
        "base_model.model.lm_head.weight", torch.zeros(4, 4))), "unsupported_adapter", pinned="base"),
    commit_case("adapter-lora-bias-tensor", lambda: adapter(edit=lambda f: f.__setitem__(
        _Q + ".lora_B.bias", torch.zeros(64))), "unsupported_adapter", pinned="base"),
    commit_case("adapter-dora-magnitude", lambda: adapter(edit=lambda f: f.__setitem__(
        _Q + ".lora_magnitude_vector", torch.ones(64))), "unsupported_adapter", pinned="base"),
    commit_case("adapter-3d-factor", lambda: adapter(edit=lambda f: f.__setitem__(
        _Q + ".lora_A.weight", torch.zeros(4, 64, 1))), "unsupported_adapter", pinned="base"),
    commit_case("adapter-wrong-shapes-vs-base", lambda: adapter(shape=Shape(hidden=32, intermediate=64)),
                "shape_mismatch", pinned="base"),
    commit_case("adapter-module-not-in-base", lambda: adapter(
        config=_set(target_modules=["q_proj", "v_proj", "nope_proj"]),
        edit=lambda f: f.update({_Q.replace("q_proj", "nope_proj") + ".lora_A.weight": torch.zeros(4, 64),
                                 _Q.replace("q_proj", "nope_proj") + ".lora_B.weight": torch.zeros(64, 4)})),
                "shape_mismatch", pinned="base"),
    commit_case("adapter-files-as-finetune", lambda: adapter(), "shape_mismatch", pinned="base", kind="finetune"),
    commit_case("finetune-without-base", lambda: tiny(), "base_required", kind="finetune"),
    commit_case("finetune-wrong-shape", lambda: tiny(lambda w: w.__setitem__("model.norm.weight", torch.ones(7))),
                "shape_mismatch", pinned="tiny", kind="finetune"),
    commit_case("finetune-missing-tensor", lambda: tiny(lambda w: _del(w, "lm_head.weight")), "shape_mismatch",
                pinned="tiny", kind="finetune"),
    commit_case("finetune-extra-tensor", lambda: tiny(lambda w: w.__setitem__("extra.weight", torch.ones(2))),
                "shape_mismatch", pinned="tiny", kind="finetune"),
    commit_case("finetune-shrunk-vocab", lambda: tiny(lambda w: w.__setitem__("lm_head.weight", torch.zeros(8, 8))),
                "shape_mismatch", pinned="tiny", kind="finetune"),
    commit_case("base-without-weights", lambda: {"config.json": b"{}"}, "missing_weights"),
    commit_case("base-duplicate-tensor", lambda: (lambda f: {**f, "extra.safetensors": f["model.safetensors"]})(
        tiny()), "duplicate_tensor"),
    commit_case("index-missing-shard", lambda: {k: v for k, v in tiny(shards=2).items()
                                                if k != "model-00002-of-00002.safetensors"}, "invalid_index"),
    commit_case("index-weight-map-not-object", lambda: {**tiny(shards=2), "model.safetensors.index.json":
                                                        b'{"weight_map": [1]}'}, "invalid_index"),
    commit_case("index-shard-not-string", lambda: {**tiny(shards=2), "model.safetensors.index.json":
                                                   b'{"weight_map": {"lm_head.weight": 1}}'}, "invalid_index"),
    commit_case("index-unlisted-tensor", lambda: (lambda f: {**f, "model.safetensors.index.json": json.dumps(
        {"weight_map": {k: v for k, v in json.loads(f["model.safetensors.index.json"])["weight_map"].items()
                        if k != "lm_head.weight"}}).encode()})(tiny(shards=2)), "invalid_index"),
    commit_case("index-array", lambda: {**tiny(shards=2), "model.safetensors.index.json": b"[]"}, "invalid_index"),
    Case("duplicate-content", lambda c: (lambda files: (c.ok(c.files_then_commit(files)),
                                                        c.files_then_commit(files))[1])(tiny()), 409,
         "duplicate_content"),
    Case("duplicate-content-other-draft-same-base", lambda c: (lambda files: (
        c.ok(c.files_then_commit(files, base=c.tiny_ref, kind="finetune")),
        c.files_then_commit(files, base=c.tiny_ref, kind="finetune"))[1])(
        tiny(lambda w: w["lm_head.weight"].add_(1.0))), 409, "duplicate_content"),
]

# Tags added later, version paths and refs in URLs.
CASES += [
    Case("version-tags-push-over-limit", lambda c: (lambda v: (c.ok(c.http.post(
        f"/models/{c.name}/versions/1/tags", json={"tags": {f"a{i}": "v" for i in range(200)}})), c.mark(),
        c.http.post(f"/models/{c.name}/versions/1/tags", json={"tags": {f"b{i}": "v" for i in range(57)}}))[2])(
        c.ok(c.files_then_commit(tiny(lambda w: w["lm_head.weight"].add_(2.0))))), 422, "too_many_tags"),
    Case("version-tags-bytes-over-limit", lambda c: (lambda v: (c.mark(), c.http.post(
        f"/models/{c.name}/versions/1/tags", json={"tags": {f"b{i}": "x" * 1024 for i in range(70)}}))[1])(
        c.ok(c.files_then_commit(tiny(lambda w: w["lm_head.weight"].add_(3.0))))), 422, "tags_too_large"),
    Case("model-tag-over-limit", lambda c: (c.ok(c.http.post("/models", json={
        "name": c.name, "kind": "base", "tags": {f"a{i}": "v" for i in range(256)}})), c.mark(),
        c.http.put(f"/models/{c.name}/tags/one-more", json={"value": "v"}))[2], 422, "too_many_tags"),
    Case("model-create-too-many-tags", lambda c: (c.mark(), c.http.post("/models", json={
        "name": c.name, "kind": "base", "tags": {f"a{i}": "v" for i in range(257)}}))[1], 422, "too_many_tags"),
    Case("version-tag-key-newline", lambda c: (c.mark(), c.http.post(
        f"/models/{model_of(c)}/versions/1/tags", json={"tags": {"stage\n": "v"}}))[1], 422, "invalid_tag"),
    Case("model-create-tag-key-newline", lambda c: (c.mark(), c.http.post(
        "/models", json={"name": c.name, "kind": "base", "tags": {"stage\n": "v"}}))[1], 422, "invalid_tag"),
    Case("version-path-superscript", lambda c: (c.mark(), c.http.get(f"/models/{model_of(c)}/versions/²"))[1], 422,
         "invalid_ref"),
    Case("version-path-arabic-indic", lambda c: (c.mark(), c.http.get(f"/models/{model_of(c)}/versions/١"))[1], 422,
         "invalid_ref"),
    Case("version-path-file-superscript", lambda c: (c.mark(), c.http.get(
        f"/models/{model_of(c)}/versions/²/files/model.safetensors"))[1], 422, "invalid_ref"),
    Case("version-path-tags-arabic-indic", lambda c: (c.mark(), c.http.post(
        f"/models/{model_of(c)}/versions/١/tags", json={"tags": {"k": "v"}}))[1], 422, "invalid_ref"),
    Case("alias-set-unicode-version", lambda c: (c.mark(), c.http.put(
        f"/models/{model_of(c)}/aliases/prod", json={"version": "١"}))[1], 422, "invalid_ref"),
    Case("alias-set-newline-name", lambda c: (c.mark(), c.http.put(
        f"/models/{model_of(c)}/aliases/prod%0A", json={"version": "1"}))[1], 422, "invalid_alias"),
    Case("refs-trailing-newline", lambda c: (c.mark(), c.http.get(f"/refs/{model_of(c)}%0A"))[1], 422, "invalid_ref"),
    Case("cursor-unicode-digits", lambda c: (c.mark(), c.http.get("/versions", params={"cursor": "١٢"}))[1], 422,
         "invalid_cursor"),
]


@pytest.fixture(scope="module")
def tiny_ref(server: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = save_checkpoint(tmp_path_factory.mktemp("tiny") / "t", random_weights(TINY, seed=5), TINY)
    with server.client() as rc:
        return str(rc.push(folder, "bad-input-tiny").ref)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(server: Server, base_ref: str, tiny_ref: str, case: Case) -> None:
    c = C(server, base_ref, tiny_ref)
    outcomes: list[str] = []
    detail = ""
    try:
        r = case.run(c)
    except (httpx.TimeoutException, TimeoutError) as e:
        outcomes, detail = ["hang"], str(e)
        r = None
    if r is not None:
        if r.status_code >= 500:
            outcomes.append("5xx")
        elif 400 <= r.status_code < 500:
            outcomes.append("4xx")
        try:
            body = r.json()
            code = body["error"]["code"]
            shape_ok = set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"} \
                and bool(body["error"]["message"])
        except Exception:  # noqa: BLE001
            code, shape_ok = None, False
        if (r.status_code, code) != (case.status, case.code) or not shape_ok:
            outcomes.append("unexpected_answer")
            detail = f"{r.status_code} {r.text[:300]}"
    assert c.before is not None, "the case never marked its bad request"
    left = leftovers(c.before, snapshot(server))
    if left:
        outcomes.append("partial_state")
        detail += f" left: {left}"
    RESULTS.append({"backend": server.backend, "case": case.id, "outcomes": outcomes, "detail": detail})
    c.http.close()
    assert outcomes == ["4xx"], f"{case.id}: expected {case.status} {case.code}: {outcomes} {detail}"


def test_corpus_size() -> None:
    assert len(CASES) >= 120


def test_range_strict_and_unicode_versions(api: Api, base_ref: str) -> None:
    model = base_ref.split("@")[0]
    url = f"{api.url}/models/{model}/versions/1/files/config.json"
    whole = httpx.get(url)
    assert whole.status_code == 200
    for bad in (b"bytes=1_0-2_0", b"bytes=+1-2", b"bytes= 1-2", "bytes=١-٢".encode()):
        r = httpx.get(url, headers={"Range": bad})
        assert r.status_code == 200 and r.content == whole.content, bad
    r = httpx.get(url, headers={"Range": "bytes=1-2"})
    assert r.status_code == 206 and r.content == whole.content[1:3]
    assert httpx.get(f"{api.url}/models/{model}/versions/1").status_code == 200
    assert_error(httpx.get(f"{api.url}/models/{model}/versions/١"), 422, "invalid_ref")
