"""Bad input: each case gets a clear 4xx with {error: {code, message, details}} and leaves no
partial state (no new version, model, blob row or stored object)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import create_engine, text

from registry.demo import Shape, lora_factors, make_base, random_weights, save_adapter, save_checkpoint

from .conftest import Server


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
        return str(rc.push(folder, "bad-input-base")["ref"])


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
    err = assert_error(api.push_folder(save_adapter(tmp_path / "a", factors, r=4), model=name, base=base_ref), 422,
                       "shape_mismatch")
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


