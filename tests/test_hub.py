"""The Hugging Face Hub-compatible read API, with the real clients: ``huggingface_hub``
(``snapshot_download``, ``hf_hub_download``, ``HfApi().model_info``, ``list_repo_files``),
transformers' and PEFT's ``from_pretrained``, pointed at a registry server subprocess with
``HF_ENDPOINT`` and nothing else reachable (every other host goes to a proxy that refuses; a fresh
``HF_HOME``; ``HF_HUB_OFFLINE`` unset). The models are built in code with transformers and PEFT: a
tiny Llama, its continued v2, a full fine-tune and LoRA adapters on it, saved with
``save_pretrained`` (so an adapter's config names the pusher's local folder as its base).
Stored versions on SQLite and PostgreSQL; ``derived:basis`` and ``derived:diff`` versions with
real workers; the protocol's headers, redirects, ranges and errors with raw HTTP."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.formats.peft import resolvable_config
from registry.services import hub

from .conftest import Server, Stack, make_server, make_stack

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFUSING_PROXY = "http://127.0.0.1:9"  # nothing listens there: any host but the registry is unreachable


# ----------------------------------------------------------------------------- models, built in code


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, base-v2 (continued), finetune (full weights) and lora0..lora2 (PEFT LoRA on base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    for label, seed, scale in (("base-v2", 1, 0.01), ("finetune", 2, 0.002)):
        m = LlamaForCausalLM.from_pretrained(root / "base")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        m.save_pretrained(root / label)
    for i in range(3):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:  # PEFT starts B at zero: give every factor values
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(root / f"lora{i}")
    return {p.name: p for p in root.iterdir()}


# ----------------------------------------------------------------------------- helpers


def _field(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def _version(url: str, ref: str) -> dict[str, Any]:
    name, v = ref.split("@")
    r = httpx.get(f"{url}/api/v1/models/{name}/versions/{v}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _commit(v: dict[str, Any]) -> str:
    """The documented commit: 32 hex digits of the content sha256, the version number in 8."""
    return v["content_sha256"][:32] + f"{v['version']:08x}"


def _pushed(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def client_env(url: str, hf_home: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "REGISTRY_")) and not k.lower().endswith("_proxy")}
    env.update({"HF_ENDPOINT": url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                "HTTP_PROXY": REFUSING_PROXY, "HTTPS_PROXY": REFUSING_PROXY, "ALL_PROXY": REFUSING_PROXY,
                "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": str(ROOT)})
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_client(url: str, scratch: Path, ops: list[dict[str, Any]], token: str | None = None) -> list[dict[str, Any]]:
    """``tests/hub_client.py`` in a fresh process, in an empty folder (transformers would load a
    local folder named like the repo id instead), with a fresh ``HF_HOME``."""
    scratch.mkdir(parents=True, exist_ok=True)
    cwd = scratch / "cwd"
    cwd.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, str(HERE / "hub_client.py"), json.dumps(ops)], cwd=cwd,
                       env=client_env(url, scratch / "hf-home", token), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    out: list[dict[str, Any]] = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out) == len(ops)
    return out


def ok(outcome: dict[str, Any]) -> Any:
    assert "ok" in outcome, f"{outcome.get('error')}: {outcome.get('message')}\n{outcome.get('trace')}"
    return outcome["ok"]


def raised(outcome: dict[str, Any], error: str) -> str:
    assert outcome.get("error") == error, outcome
    return str(outcome["message"])


def assert_error(r: httpx.Response, status: int, code: str, hub_code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.headers, r.text)
    assert r.headers.get("x-error-code") == hub_code, r.headers
    assert r.headers.get("x-error-message"), r.headers
    if r.request.method != "HEAD":
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
        assert body["error"]["code"] == code, body
        return body["error"]  # type: ignore[no-any-return]
    return {}


# ----------------------------------------------------------------------------- the rules (no server)


@pytest.mark.parametrize("repo_id", [
    "gpt2", "acme/llama-3-8b", "a", "a/b", "_x", "x_", "A.b-c_d/E.f", "x" * 96, "n/" + "y" * 96,
    "x" * 97, "-a", "a-", ".a", "a.", "a--b", "a..b", "a/b/c", "/a", "a/", "", "a.git", "a/b.git",
    "café", "a b", "a@1", "ns/-x", "ns-/x",
])
def test_repo_ids_follow_the_hub_clients_rule(repo_id: str) -> None:
    """``is_repo_id`` agrees with huggingface_hub's own validator (the oracle), and the mapping to
    model names is one-to-one: ``namespace/name`` is model ``namespace--name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = True
    except HFValidationError:
        valid = False
    assert hub.is_repo_id(repo_id) == valid
    name = hub.model_name_of(repo_id)
    if name is not None:
        assert hub.repo_id_of(name) == repo_id
        assert "/" not in name and (name == repo_id or name == repo_id.replace("/", "--"))


@pytest.mark.parametrize("model", ["demo-base", "acme--llama", "a--b--c", "x-", "a..b", "y" * 97 + "--z", "_no"])
def test_model_names_map_to_repo_ids_or_to_none(model: str) -> None:
    rid = hub.repo_id_of(model)
    expected = {"demo-base": "demo-base", "acme--llama": "acme/llama"}.get(model)
    assert rid == expected
    if rid is not None:
        assert hub.model_name_of(rid) == model


def test_the_served_config_rule() -> None:
    raw = (json.dumps({"r": 4, "base_model_name_or_path": "/home/me/base", "revision": None,
                       "target_modules": ["q_proj"]}, indent=2, sort_keys=True) + "\n").encode()
    out = resolvable_config(raw, "acme/base", "ab" * 20)
    cfg = json.loads(out)
    assert list(cfg) == list(json.loads(raw))  # every key, in its order
    assert cfg == {**json.loads(raw), "base_model_name_or_path": "acme/base", "revision": "ab" * 20}
    assert resolvable_config(out, "acme/base", "ab" * 20) is out  # already resolvable: the same bytes
    assert resolvable_config(b"[1, 2]", "x", "y") == b"[1, 2]"  # not an object: nothing to rewrite
    no_revision = json.dumps({"base_model_name_or_path": "x"}).encode()
    assert json.loads(resolvable_config(no_revision, "b", "c")) == {"base_model_name_or_path": "b", "revision": "c"}


# ----------------------------------------------------------------------------- stored versions


@pytest.fixture(scope="module")
def family(server: Server, tiny: dict[str, Path]) -> dict[str, Any]:
    """On ``server``: ``hubt-base`` @1 (alias production) and @2 (the v2 weights), an adapter
    ``acme--hubt-lora`` (repo ``acme/hubt-lora``) pinned to @1, and the same adapter files pinned
    to @2 as ``acme--hubt-lora@2``."""
    with server.client() as rc:
        b1 = _field(rc.push(tiny["base"], "hubt-base", aliases=["production"]), "ref")
        lora = _field(rc.push(tiny["lora0"], "acme--hubt-lora", base="hubt-base@production"), "ref")
        b2 = _field(rc.push(tiny["base-v2"], "hubt-base"), "ref")
        repinned = _field(rc.push(tiny["lora0"], "acme--hubt-lora", base=b2), "ref")
    return {"b1": _version(server.url, b1), "b2": _version(server.url, b2), "lora": _version(server.url, lora),
            "repinned": _version(server.url, repinned)}


def test_hub_client_loads_stored_versions(server: Server, family: dict[str, Any], tiny: dict[str, Path],
                                          tmp_path: Path) -> None:
    b1, b2, lora = family["b1"], family["b2"], family["lora"]
    base_files, lora_files = _pushed(tiny["base"]), _pushed(tiny["lora0"])
    ops: list[dict[str, Any]] = [
        {"op": "model_info", "repo": "hubt-base"},  # 0: main = latest = @2
        {"op": "model_info", "repo": "hubt-base", "revision": "production"},
        {"op": "list_repo_files", "repo": "acme/hubt-lora", "revision": "1"},
        {"op": "download", "repo": "hubt-base", "path": "config.json", "revision": "1"},
        {"op": "download", "repo": "hubt-base", "path": "model.safetensors", "revision": _commit(b1)},
        {"op": "download", "repo": "hubt-base", "path": "model.safetensors", "revision": b1["content_sha256"]},  # 5
        {"op": "snapshot", "repo": "hubt-base", "revision": "production"},
        {"op": "snapshot", "repo": "acme/hubt-lora", "revision": "1"},
        {"op": "causal_lm", "repo": "hubt-base", "revision": "production", "local": str(tiny["base"])},
        {"op": "causal_lm", "repo": "hubt-base", "local": str(tiny["base-v2"])},
        {"op": "peft_auto", "repo": "acme/hubt-lora", "revision": "1", "local_base": str(tiny["base"]),  # 10
         "local_adapter": str(tiny["lora0"])},
        {"op": "peft_on_base", "base_repo": "hubt-base", "base_revision": "1", "repo": "acme/hubt-lora",
         "revision": _commit(lora), "local_base": str(tiny["base"]), "local_adapter": str(tiny["lora0"])},
        # bad input: the errors the client raises for each
        {"op": "download", "repo": "no-such-model", "path": "config.json"},
        {"op": "download", "repo": "other/hubt-lora", "path": "adapter_config.json"},  # no model other--hubt-lora
        {"op": "download", "repo": "hubt-lora", "path": "adapter_config.json"},  # not acme--hubt-lora
        {"op": "download", "repo": "hubt-base", "path": "config.json", "revision": "99"},  # 15
        {"op": "download", "repo": "hubt-base", "path": "config.json", "revision": "no-such-alias"},
        {"op": "download", "repo": "hubt-base", "path": "config.json", "revision": "0" * 40},
        {"op": "download", "repo": "hubt-base", "path": "config.json", "revision": _commit(b1)[:32] + "00000009"},
        {"op": "download", "repo": "hubt-base", "path": "nope.json", "revision": "1"},
        {"op": "model_info", "repo": "hubt-base", "revision": "99"},  # 20
        {"op": "list_repo_files", "repo": "no-such-model"},
        {"op": "download", "repo": "acme/hubt-lora", "path": "adapter_config.json",
         "revision": lora["content_sha256"]},  # two versions hold these files: ambiguous
    ]
    out = run_client(server.url, tmp_path, ops)

    info = ok(out[0])
    assert info["id"] == "hubt-base" and info["sha"] == _commit(b2)
    info = ok(out[1])
    assert info["sha"] == _commit(b1)
    assert info["siblings"] == sorted([f["path"], f["size"], f["sha256"]] for f in b1["files"])
    assert ok(out[2]) == sorted(lora_files)
    assert ok(out[3]) == base_files["config.json"]
    assert ok(out[4]) == ok(out[5]) == base_files["model.safetensors"]
    snap = ok(out[6])
    assert snap["folder"] == _commit(b1) and snap["files"] == base_files  # byte-exact, every file

    # the adapter: weights byte-exact; its config names the base as the registry resolves it
    snap = ok(out[7])
    assert snap["folder"] == _commit(lora) and set(snap["files"]) == set(lora_files)
    assert snap["files"]["adapter_model.safetensors"] == lora_files["adapter_model.safetensors"]
    pushed_cfg = json.loads((tiny["lora0"] / "adapter_config.json").read_text())
    assert pushed_cfg["base_model_name_or_path"] == str(tiny["base"])  # the pusher's local folder
    served_cfg = json.loads(snap["adapter_config"])
    assert served_cfg == {**pushed_cfg, "base_model_name_or_path": "hubt-base", "revision": _commit(b1)}
    assert snap["files"]["adapter_config.json"] != lora_files["adapter_config.json"]

    # transformers and PEFT load them, and compute what the local folders compute
    assert ok(out[8])["equal"] and ok(out[9])["equal"]
    peft = ok(out[10])
    assert peft["equal"], peft
    assert (peft["base"], peft["base_revision"]) == ("hubt-base", _commit(b1))
    assert ok(out[11])["equal"]

    for i in (12, 13, 14, 21):
        raised(out[i], "RepositoryNotFoundError")
    assert "namespace--name" in out[13]["message"]
    for i in (15, 16, 17, 18, 20):
        raised(out[i], "RevisionNotFoundError")
    raised(out[19], "RemoteEntryNotFoundError")
    msg = raised(out[22], "RevisionNotFoundError")
    assert "409" in msg and _commit(family["repinned"]) in msg and _commit(lora) in msg

    # the native API still returns the pushed bytes: the storage promise
    with server.client() as rc:
        rc.pull(lora["ref"], tmp_path / "pulled")
    assert _pushed(tmp_path / "pulled") == lora_files
    r = httpx.get(f"{server.url}/api/v1/models/acme--hubt-lora/versions/1/files/adapter_config.json")
    assert r.content == (tiny["lora0"] / "adapter_config.json").read_bytes()
    assert r.headers["etag"] == f'"{lora_files["adapter_config.json"]}"'


def test_repinned_adapters_have_their_own_commit_and_config(server: Server, family: dict[str, Any]) -> None:
    """One adapter's files pinned to two bases: one content sha256, two commits, two configs."""
    lora, repinned = family["lora"], family["repinned"]
    assert lora["content_sha256"] == repinned["content_sha256"] and _commit(lora) != _commit(repinned)
    configs = []
    for v in (lora, repinned):
        r = httpx.get(f"{server.url}/acme/hubt-lora/resolve/{_commit(v)}/adapter_config.json")
        assert r.status_code == 200 and r.headers["x-repo-commit"] == _commit(v)
        configs.append(r.json())
    assert configs[0]["revision"] == _commit(family["b1"]) and configs[1]["revision"] == _commit(family["b2"])
    r = httpx.get(f"{server.url}/api/models/acme/hubt-lora/revision/{lora['content_sha256']}")
    err = assert_error(r, 409, "ambiguous_revision", "RevisionNotFound")
    assert err["details"]["versions"] == [lora["version"], repinned["version"]]


def _served(url: str, repo: str, v: dict[str, Any]) -> dict[str, bytes]:
    """Every file of version ``v`` as the Hub view serves it (the adapter config generated), by path."""
    files = {}
    for f in v["files"]:
        r = httpx.get(f"{url}/{repo}/resolve/{_commit(v)}/{f['path']}", timeout=120)
        assert r.status_code == 200, r.text
        files[f["path"]] = r.content
    return files


def _blob_oid(data: bytes) -> str:
    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
               f"size {len(data)}\n").encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


def test_hub_file_system_paths_info_and_refs(server: Server, family: dict[str, Any], tmp_path: Path) -> None:
    """``HfFileSystem`` lists, stats (through paths-info), opens and reads by range a stored file and
    a generated one (the adapter config naming its base); ``get_paths_info`` answers the paths that
    exist, in the order asked; ``list_repo_refs`` lists the aliases as branches and the versions as tags."""
    b1, b2, lora, repinned = family["b1"], family["b2"], family["lora"], family["repinned"]
    served = _served(server.url, "acme/hubt-lora", lora)
    ops: list[dict[str, Any]] = [
        {"op": "fs", "repo": "acme/hubt-lora", "revision": "1", "path": "adapter_model.safetensors",
         "start": 100, "length": 50},
        {"op": "fs", "repo": "acme/hubt-lora", "revision": "1", "path": "adapter_config.json", "start": 10,
         "length": 20},
        {"op": "paths_info", "repo": "acme/hubt-lora", "revision": "1", "expand": True,
         "paths": ["adapter_config.json", "nope.bin", "adapter_model.safetensors", "adapter_config.json"]},
        {"op": "paths_info", "repo": "hubt-base", "revision": "production", "paths": ["config.json"]},
        {"op": "refs", "repo": "hubt-base", "include_prs": True},
        {"op": "refs", "repo": "acme/hubt-lora"},  # 5
        {"op": "paths_info", "repo": "acme/nope", "paths": ["config.json"]},
        {"op": "paths_info", "repo": "hubt-base", "revision": "99", "paths": ["config.json"]},
        {"op": "fs", "repo": "acme/hubt-lora", "revision": "99", "path": "adapter_config.json", "start": 0,
         "length": 1},
        {"op": "refs", "repo": "acme/nope"},
    ]
    out = run_client(server.url, tmp_path, ops)

    root = "acme/hubt-lora@1"
    reads = (("adapter_model.safetensors", 100, 50), ("adapter_config.json", 10, 20))
    for i, (path, start, length) in enumerate(reads):
        fs = ok(out[i])
        data = served[path]
        assert fs["sha256"] == fs["cat_sha256"] == hashlib.sha256(data).hexdigest()
        assert bytes.fromhex(fs["part"]) == data[start:start + length]
        assert fs["info"] == fs["info_refreshed"] == [f"{root}/{path}", "file", len(data)]
        assert fs["exists"] == [True, False]
        assert fs["ls"] == sorted([f"{root}/{p}", "file", len(d)] for p, d in served.items())
    assert json.loads(served["adapter_config.json"])["revision"] == _commit(b1)  # the generated config

    assert ok(out[2]) == [["file", p, len(served[p]), _blob_oid(served[p]), hashlib.sha256(served[p]).hexdigest(),
                           _commit(lora)] for p in ("adapter_config.json", "adapter_model.safetensors")]
    cfg = next(f for f in b1["files"] if f["path"] == "config.json")
    assert ok(out[3]) == [["file", "config.json", cfg["size"], ok(out[3])[0][3], cfg["sha256"], None]]

    def refs(*pairs: tuple[str, dict[str, Any]], kind: str = "heads") -> list[list[str]]:
        return [[n, f"refs/{kind}/{n}", _commit(v)] for n, v in pairs]

    assert ok(out[4]) == {"branches": refs(("main", b2), ("production", b1)),
                          "tags": refs(("1", b1), ("2", b2), kind="tags"), "converts": [], "pull_requests": []}
    assert ok(out[5]) == {"branches": refs(("main", repinned)), "tags": refs(("1", lora), ("2", repinned), kind="tags"),
                          "converts": [], "pull_requests": None}
    raised(out[6], "RepositoryNotFoundError")
    raised(out[7], "RevisionNotFoundError")
    raised(out[8], "FileNotFoundError")
    raised(out[9], "RepositoryNotFoundError")


def _paths_info(url: str, repo: str, revision: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/api/models/{repo}/paths-info/{revision}", timeout=60, **kw)


def test_paths_info_folders_bodies_and_bad_input(server: Server, tiny: dict[str, Path], name: str,
                                                 tmp_path: Path) -> None:
    folder = tmp_path / "nested"
    folder.mkdir()
    for p in tiny["base"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "extra" / "notes").mkdir(parents=True)
    (folder / "extra" / "notes" / "readme.txt").write_text("hello\n")
    with server.client() as rc:
        v = _version(server.url, _field(rc.push(folder, name, aliases=["stable"]), "ref"))
    commit = _commit(v)

    # the client's form body: folders, files, in the order asked, each once; slashes around a path dropped
    r = _paths_info(server.url, name, "1", data={"paths": ["extra", "extra/notes/readme.txt", "nope", "", "/extra/",
                                                           "extra/notes", "config.json/"], "expand": "false"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [(e["type"], e["path"]) for e in got] == [("directory", "extra"), ("file", "extra/notes/readme.txt"),
                                                    ("directory", "extra/notes"), ("file", "config.json")]
    assert got[0]["oid"] == hub.Folder("extra").oid(commit) and "lastCommit" not in got[0]
    assert got[1] == {"type": "file", "oid": _blob_oid(b"hello\n"), "size": 6, "path": "extra/notes/readme.txt",
                      "lfs": {"oid": hashlib.sha256(b"hello\n").hexdigest(), "size": 6, "pointerSize": got[1]["lfs"][
                          "pointerSize"]}}
    tree = httpx.get(f"{server.url}/api/models/{name}/tree/1", params={"recursive": "true"}).json()
    assert all(e in tree for e in got)  # the tree's entries, exactly
    # a JSON body, expanded; at an alias
    r = _paths_info(server.url, name, "stable", json={"paths": "extra/notes", "expand": True})
    assert r.status_code == 200 and r.json()[0]["lastCommit"]["id"] == commit, r.text
    assert _paths_info(server.url, name, "1", data={}).json() == []  # nothing asked, nothing answered

    assert_error(_paths_info(server.url, name, "1", data={"paths": "../config.json"}), 422, "unsafe_path")
    for extra in ({}, {"expand": "true"}):
        assert_error(_paths_info(server.url, name, "1", data={"paths": ["x"] * 1001, **extra}), 422, "too_many_paths")
    assert _paths_info(server.url, name, "1", data={"paths": ["config.json"] * 1000}).json() == got[-1:]
    assert_error(_paths_info(server.url, name, "1", data={"paths": "x", "expand": "maybe"}), 422, "invalid_request")
    for body in (b"[1]", b'{"paths": [1]}', b'{"paths": "x", "expand": "yes"}', b"{"):
        assert_error(_paths_info(server.url, name, "1", content=body, headers={"Content-Type": "application/json"}),
                     422, "invalid_request")
    assert_error(_paths_info(server.url, name, "1", content=b"paths=x", headers={"Content-Type": "text/plain"}),
                 422, "invalid_request")
    assert_error(_paths_info(server.url, name, "1", content=b"\xff", headers={"Content-Type":
                                                                               "application/x-www-form-urlencoded"}),
                 422, "invalid_request")
    r = _paths_info(server.url, name, "1", content=b"p" * (2 << 20))  # over REGISTRY_MAX_JSON_BODY_BYTES
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert_error(_paths_info(server.url, name, "9", data={"paths": "x"}), 404, "version_not_found", "RevisionNotFound")
    assert_error(_paths_info(server.url, "nope-x", "1", data={"paths": "x"}), 404, "model_not_found", "RepoNotFound")
    assert_error(httpx.post(f"{server.url}/api/models/{name}/paths-info"), 404, "not_found")  # no revision

    # refs of a model with no version yet: nothing to list
    assert httpx.post(f"{server.url}/api/v1/models", json={"name": f"{name}-empty", "kind": "base"}).status_code == 201
    assert httpx.get(f"{server.url}/api/models/{name}-empty/refs").json() == {"branches": [], "converts": [],
                                                                            "tags": []}
    assert_error(httpx.get(f"{server.url}/api/models/nope-x/refs"), 404, "model_not_found", "RepoNotFound")


# ----------------------------------------------------------------------------- the protocol, raw


def test_resolve_headers_redirects_and_ranges(server: Server, family: dict[str, Any], tiny: dict[str, Path]) -> None:
    b1 = family["b1"]
    f = next(x for x in b1["files"] if x["path"] == "model.safetensors")
    data = (tiny["base"] / "model.safetensors").read_bytes()
    at_alias = f"{server.url}/hubt-base/resolve/production/model.safetensors"
    at_commit = f"{server.url}/hubt-base/resolve/{_commit(b1)}/model.safetensors"

    # a movable revision: 307 to the commit, relative, with the file's metadata
    for method in ("HEAD", "GET"):
        r = httpx.request(method, at_alias)
        assert r.status_code == 307, r.text
        assert r.headers["location"] == f"/hubt-base/resolve/{_commit(b1)}/model.safetensors"
        assert r.headers["x-repo-commit"] == _commit(b1)
        assert r.headers["x-linked-etag"] == f'"{f["sha256"]}"' and r.headers["x-linked-size"] == str(f["size"])
    r = httpx.get(at_alias, follow_redirects=True)
    assert r.status_code == 200 and r.content == data and str(r.url) == at_commit

    # at the commit: the bytes
    h = httpx.head(at_commit)
    assert h.status_code == 200
    assert h.headers["etag"] == h.headers["x-linked-etag"] == f'"{f["sha256"]}"'
    assert h.headers["x-linked-size"] == h.headers["content-length"] == str(f["size"])
    assert h.headers["x-repo-commit"] == _commit(b1) and h.headers["accept-ranges"] == "bytes"
    assert "immutable" in h.headers["cache-control"]
    r = httpx.get(at_commit, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{f['size']}" and r.headers["content-length"] == "100"
    r = httpx.get(at_commit, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]
    assert httpx.get(at_commit, headers={"If-None-Match": h.headers["etag"]}).status_code == 304
    r = httpx.get(at_commit, headers={"Range": f"bytes={f['size']}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{f['size']}"
    assert r.json()["error"]["code"] == "range_not_satisfiable"

    # the tree, at the root, recursive and in a folder
    tree = httpx.get(f"{server.url}/api/models/hubt-base/tree/1", params={"recursive": "true"}).json()
    assert sorted(e["path"] for e in tree) == sorted(x["path"] for x in b1["files"])
    e = next(e for e in tree if e["path"] == "model.safetensors")
    assert e["type"] == "file" and e["lfs"]["oid"] == f["sha256"] and e["size"] == f["size"]
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f['sha256']}\nsize {f['size']}\n".encode()
    assert e["oid"] == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    assert e["lfs"]["pointerSize"] == len(pointer)
    expanded = httpx.get(f"{server.url}/api/models/hubt-base/tree/1", params={"expand": "true"}).json()
    assert all(x["lastCommit"]["id"] == _commit(b1) for x in expanded)


def test_unknown_repos_revisions_and_files(server: Server, family: dict[str, Any]) -> None:
    u = server.url
    lora = family["lora"]
    for method in ("HEAD", "GET"):
        assert_error(httpx.request(method, f"{u}/nope-x/resolve/main/config.json"), 404, "model_not_found",
                     "RepoNotFound")
        assert_error(httpx.request(method, f"{u}/hubt-base/resolve/42/config.json"), 404, "version_not_found",
                     "RevisionNotFound")
        r = httpx.request(method, f"{u}/acme/hubt-lora/resolve/1/nope.bin")
        assert_error(r, 404, "file_not_found", "EntryNotFound")
        assert r.headers["x-repo-commit"] == _commit(lora)  # the client caches the absence under it
    assert_error(httpx.get(f"{u}/api/models/nope-x"), 404, "model_not_found", "RepoNotFound")
    assert_error(httpx.get(f"{u}/api/models/acme/nope"), 404, "model_not_found", "RepoNotFound")
    assert_error(httpx.get(f"{u}/api/models/hubt-base/revision/latest2"), 404, "version_not_found",
                 "RevisionNotFound")
    assert_error(httpx.get(f"{u}/api/models/hubt-base/revision/%C2%B2"), 404, "version_not_found",
                 "RevisionNotFound")  # '²' is no version number
    assert_error(httpx.get(f"{u}/api/models/hubt-base/tree/1/no-folder"), 404, "file_not_found", "EntryNotFound")
    assert_error(httpx.get(f"{u}/api/models/hubt-base/tree/1/config.json"), 404, "file_not_found",
                 "EntryNotFound")  # a file is no folder
    assert_error(httpx.get(f"{u}/api/models/hubt-base/elsewhere/1"), 404, "not_found")
    assert_error(httpx.get(f"{u}/api/models/a--b"), 404, "model_not_found", "RepoNotFound")  # no valid repo id
    # the registry's own API keeps its answers (the Hub's routes come last)
    assert httpx.get(f"{u}/api/v1/health").status_code == 200
    assert httpx.get(f"{u}/api/v1/drafts").status_code == 405


def _raw_get(url: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """A request whose path goes out exactly as written (no client normalising ``..``)."""
    parts = urlsplit(url)
    c = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


@pytest.mark.parametrize("path", [
    "/hubt-base/resolve/1/../../../etc/passwd", "/hubt-base/resolve/1/%2e%2e/%2e%2e/etc/passwd",
    "/hubt-base/resolve/1/%2Fetc%2Fpasswd", "/hubt-base/resolve/1/a%5C..%5Cconfig.json",
    "/hubt-base/resolve/1/./config.json", "/hubt-base/resolve/1/config.json%00", "/api/models/hubt-base/tree/1/..",
    "/api/models/hubt-base/tree/1/%2e%2e%2fhubt-base",
])
def test_path_tricks_are_refused(server: Server, family: dict[str, Any], path: str) -> None:
    status, headers, body = _raw_get(server.url, path)
    assert status == 422 and json.loads(body)["error"]["code"] == "unsafe_path", (path, status, body[:300])
    assert headers["x-error-message"].startswith("unsafe file path")


def test_an_ambiguous_url_is_refused(server: Server, tiny: dict[str, Path], name: str) -> None:
    """``/api/models/{a}/tree/tree/main`` reads as repo ``a`` (revision ``tree``) or repo ``a/tree``
    (revision ``main``): with only one of them a model, that one; with both, 409."""
    with server.client() as rc:
        rc.push(tiny["base"], name)
    one = httpx.get(f"{server.url}/api/models/{name}/tree/tree/main")
    assert_error(one, 404, "version_not_found", "RevisionNotFound")  # repo {name}, revision 'tree'
    with server.client() as rc:
        rc.push(tiny["base"], f"{name}--tree")
    assert_error(httpx.get(f"{server.url}/api/models/{name}/tree/tree/main"), 409, "ambiguous_repo", "RepoNotFound")
    assert httpx.get(f"{server.url}/api/models/{name}/tree/main").status_code == 200  # one reading only


# ----------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def auth_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                pg_databases: list[str]) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, "sqlite", REGISTRY_AUTH="required")


def _token(server: Server, scope: str) -> str:
    code = ("from registry.services import tokens\nfrom registry.services.context import RegistryContext\n"
            f"ctx = RegistryContext.open(migrate=True)\nprint(tokens.create(ctx, 'hub-{scope}', '{scope}')['token'])\n"
            "ctx.close()\n")
    p = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True, check=True)
    return p.stdout.strip().splitlines()[-1]


def test_hf_token_is_the_bearer_token(auth_server: Server, tiny: dict[str, Path], tmp_path: Path) -> None:
    read, write = _token(auth_server, "read"), _token(auth_server, "write")
    with auth_server.client(write) as rc:
        ref = _field(rc.push(tiny["base"], "hubt-private"), "ref")
    v = _version_with(auth_server.url, ref, read)
    out = run_client(auth_server.url, tmp_path / "good", [
        {"op": "snapshot", "repo": "hubt-private", "revision": "1"},
        {"op": "causal_lm", "repo": "hubt-private", "local": str(tiny["base"])},
    ], token=read)
    assert ok(out[0])["files"] == _pushed(tiny["base"]) and ok(out[0])["folder"] == _commit(v)
    assert ok(out[1])["equal"]
    bad = run_client(auth_server.url, tmp_path / "bad", [
        {"op": "download", "repo": "hubt-private", "path": "config.json"},
        {"op": "model_info", "repo": "hubt-private"},
    ], token="rgt_not-a-token")
    for outcome in bad:  # a bad token is reported as one, not as a missing repository
        assert "401" in raised(outcome, "HfHubHTTPError") and "Invalid credentials" in outcome["message"]
    none = run_client(auth_server.url, tmp_path / "none", [{"op": "model_info", "repo": "hubt-private"},
                                                           {"op": "download", "repo": "hubt-private",
                                                            "path": "config.json"}])
    assert "authentication required" in raised(none[0], "HfHubHTTPError")
    assert "401" in raised(none[1], "HfHubHTTPError")

    u = auth_server.url
    r = httpx.head(f"{u}/hubt-private/resolve/1/config.json")
    assert r.status_code == 401 and "Bearer" in r.headers["x-error-message"]
    r = httpx.get(f"{u}/api/models/hubt-private", headers={"Authorization": "Bearer rgt_nope"})
    assert r.status_code == 401 and r.headers["x-error-message"] == "Invalid credentials in Authorization header"
    assert r.json()["error"]["code"] == "invalid_token"
    r = httpx.get(f"{u}/hubt-private/resolve/{_commit(v)}/config.json", headers={"Authorization": f"Bearer {read}"})
    assert r.status_code == 200 and r.content == (tiny["base"] / "config.json").read_bytes()


def _version_with(url: str, ref: str, token: str) -> dict[str, Any]:
    name, v = ref.split("@")
    r = httpx.get(f"{url}/api/v1/models/{name}/versions/{v}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- derived versions


@pytest.fixture(scope="module")
def hstack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           pg_databases: list[str]) -> Stack:
    return make_stack(request, tmp_path_factory, pg_databases, "sqla", workers=1)


def test_hub_client_loads_derived_versions(hstack: Stack, tiny: dict[str, Path], tmp_path: Path) -> None:
    """An adapter rebuilt from an RMM basis (``derived:basis``, after pruning) loads with
    ``AutoPeftModelForCausalLM`` and computes what the pushed adapter computes; a fine-tune moved to
    the v2 base and kept as base + diff (``derived:diff``) loads with ``AutoModelForCausalLM`` and
    holds v2 + (fine-tune − base), computed here."""
    with hstack.client() as rc:
        b1 = _field(rc.push(tiny["base"], "hubd-base"), "ref")
        members = [_field(rc.push(tiny[f"lora{i}"], f"acme--hubd-lora{i}", base=b1), "ref") for i in range(3)]
        basis = hstack.wait_job(_field(rc.create_basis(members, p=2, name="hubd-rmm"), "id"))
        pruned = hstack.wait_job(_field(rc.prune(basis.result["basis_id"], max_error=0.0), "id"))
        assert len(pruned.result["pruned"]) == 3, pruned
        ft = _field(rc.push(tiny["finetune"], "hubd-ft", base=b1), "ref")
        b2 = _field(rc.push(tiny["base-v2"], "hubd-base"), "ref")
        job = hstack.wait_job(_field(rc.transfer(ft, b2, storage="derived"), "id"))
        cand = job.result["ref"]
    member = _version(hstack.url, members[1])
    moved = _version(hstack.url, cand)
    assert member["storage_mode"] == "derived:basis" and moved["storage_mode"] == "derived:diff"
    assert moved["status"] == "candidate"  # not 'latest': reached by number or commit

    base, v2, fine = (load_file(tiny[k] / "model.safetensors") for k in ("base", "base-v2", "finetune"))
    oracle = {k: (v2[k].double() + fine[k].double() - base[k].double()).to(v2[k].dtype) for k in v2}
    save_file(oracle, str(tmp_path / "oracle.safetensors"))
    ops = [
        {"op": "peft_auto", "repo": "acme/hubd-lora1", "revision": str(member["version"]),
         "local_base": str(tiny["base"]), "local_adapter": str(tiny["lora1"])},
        {"op": "snapshot", "repo": "acme/hubd-lora1", "revision": _commit(member)},
        {"op": "model_info", "repo": "hubd-ft", "revision": str(moved["version"])},
        {"op": "causal_lm_weights", "repo": "hubd-ft", "revision": str(moved["version"]),
         "expected": str(tmp_path / "oracle.safetensors")},
        {"op": "snapshot", "repo": "hubd-ft", "revision": _commit(moved)},
        {"op": "model_info", "repo": "hubd-ft"},  # main: the candidate is not the newest ready version
        {"op": "fs", "repo": "acme/hubd-lora1", "revision": str(member["version"]),  # HfFileSystem (needs a namespace)
         "path": "adapter_model.safetensors", "start": 1000, "length": 64},
        {"op": "paths_info", "repo": "acme/hubd-lora1", "revision": _commit(member), "expand": True,
         "paths": ["adapter_model.safetensors", "adapter_config.json"]},
    ]
    out = run_client(hstack.url, tmp_path / "client", ops)

    peft = ok(out[0])
    assert peft["max_diff"] < 1e-4, peft  # rebuilt from the basis at full p: the original, to round-off
    assert (peft["base"], peft["base_revision"]) == ("hubd-base", _commit(_version(hstack.url, b1)))
    snap = ok(out[1])
    served = {f["path"]: f["sha256"] for f in member["files"]}
    assert snap["files"]["adapter_model.safetensors"] == served["adapter_model.safetensors"]
    assert json.loads(snap["adapter_config"])["base_model_name_or_path"] == "hubd-base"

    info = ok(out[2])
    assert info["sha"] == _commit(moved)
    assert info["siblings"] == sorted([f["path"], f["size"], f["sha256"]] for f in moved["files"])
    assert ok(out[3]) < 1e-6
    assert ok(out[4])["files"] == {f["path"]: f["sha256"] for f in moved["files"]}
    assert ok(out[5])["sha"] == _commit(_version(hstack.url, ft))

    # HfFileSystem reads the rebuilt file: whole, by range, through paths-info; the bytes the native API serves
    native = httpx.get(f"{hstack.url}/api/v1/models/acme--hubd-lora1/versions/{member['version']}/files/"
                       "adapter_model.safetensors", timeout=120).content
    fs = ok(out[6])
    assert fs["sha256"] == fs["cat_sha256"] == served["adapter_model.safetensors"] == hashlib.sha256(native).hexdigest()
    assert bytes.fromhex(fs["part"]) == native[1000:1064]
    root = f"acme/hubd-lora1@{member['version']}"
    assert fs["info"] == fs["info_refreshed"] == [f"{root}/adapter_model.safetensors", "file", len(native)]
    assert fs["exists"] == [True, False]
    assert [e[1] for e in fs["ls"]] == ["file"] * len(member["files"])
    entries = ok(out[7])
    assert [e[:3] for e in entries] == [["file", "adapter_model.safetensors", len(native)],
                                        ["file", "adapter_config.json", entries[1][2]]]
    assert entries[0][4] == served["adapter_model.safetensors"] and entries[0][5] == _commit(member)


def test_main_is_the_alias_main_else_latest(server: Server, tiny: dict[str, Path], name: str) -> None:
    """The Hub client's default revision: ``main``, the newest ready version until the model has
    an alias ``main`` (which then pins what ``from_pretrained(repo)`` loads, e.g. for vLLM's
    ``--lora-modules``, which takes no revision)."""
    with server.client() as rc:
        v1 = _version(server.url, _field(rc.push(tiny["base"], name), "ref"))
        v2 = _version(server.url, _field(rc.push(tiny["base-v2"], name), "ref"))
    info = f"{server.url}/api/models/{name}"
    assert httpx.get(info).json()["sha"] == httpx.get(info + "/revision/latest").json()["sha"] == _commit(v2)
    r = httpx.put(f"{server.url}/api/v1/models/{name}/aliases/main", json={"version": "1"})
    assert r.status_code == 200, r.text
    assert httpx.get(info).json()["sha"] == httpx.get(info + "/revision/main").json()["sha"] == _commit(v1)
    assert httpx.get(info + "/revision/latest").json()["sha"] == _commit(v2)
    h = httpx.head(f"{server.url}/{name}/resolve/main/config.json")
    assert h.status_code == 307 and h.headers["x-repo-commit"] == _commit(v1)
    info_json = httpx.get(info + "/revision/main").json()
    assert info_json["registry"] == {"ref": f"{name}@1", "kind": "base", "storage_mode": "stored", "status": "ready"}
