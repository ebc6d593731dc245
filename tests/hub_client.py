"""Runs the real Hugging Face clients against a registry (``HF_ENDPOINT``): ``tests/test_hub.py``
starts this in a fresh process (the client reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_TOKEN``
when imported) with a JSON list of operations as its argument, and reads one JSON list of
outcomes from its last stdout line: ``{"ok": value}`` or ``{"error": exception class, "message"}``.

Operations (``op`` plus its arguments):

- ``model_info`` (repo, revision): ``sha``, ``id`` and the siblings (name, size, LFS sha256);
- ``list_repo_files`` (repo, revision);
- ``download`` (repo, path, revision): the sha256 of ``hf_hub_download``'s file;
- ``snapshot`` (repo, revision): path -> sha256 of every file of ``snapshot_download``, and the
  text of its ``adapter_config.json`` when it has one;
- ``causal_lm`` (repo, revision, local): transformers' ``AutoModelForCausalLM`` from the registry
  and from the local folder ``local``: whether their logits are equal, and the largest difference;
- ``causal_lm_weights`` (repo, revision, expected): the largest difference between the loaded
  model's state dict and the tensors of the safetensors file ``expected``;
- ``peft_auto`` (repo, revision, local_base, local_adapter): PEFT's ``AutoPeftModelForCausalLM``
  from the registry (which loads the base the adapter config names, through the registry too)
  against ``PeftModel.from_pretrained`` on local folders; also the base it loaded;
- ``peft_on_base`` (base_repo, base_revision, repo, revision, local_base, local_adapter): a base
  from the registry with ``PeftModel.from_pretrained(model, repo, revision=…)``;
- ``paths_info`` (repo, paths, revision, expand): ``HfApi().get_paths_info``, each entry as
  ``[type, path, size, blob or tree id, lfs sha256, last commit id]``;
- ``refs`` (repo, include_prs): ``HfApi().list_repo_refs``: ``[name, ref, target commit]`` per branch,
  tag, convert (and pull request);
- ``fs`` (repo, revision, path, start, length): ``HfFileSystem`` on ``{repo}@{revision}``: ``ls``
  (name, type, size) of the root, ``info`` of ``path`` (asked again: ``refresh``), whether ``path``
  and ``path + ".nope"`` exist, the sha256 of ``open(path).read()``, the hex of ``length`` bytes
  read after ``seek(start)``, and the sha256 of ``cat_file``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

IDS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits


def _compare(a: Any, b: Any) -> dict[str, Any]:
    import torch

    return {"equal": bool(torch.equal(a, b)), "max_diff": float((a - b).abs().max())}


def run(op: dict[str, Any]) -> Any:
    kind = op["op"]
    if kind == "model_info":
        from huggingface_hub import HfApi

        info = HfApi().model_info(op["repo"], revision=op.get("revision"))
        return {"id": info.id, "sha": info.sha,
                "siblings": sorted([s.rfilename, s.size, s.lfs.sha256 if s.lfs else None] for s in info.siblings or [])}
    if kind == "list_repo_files":
        from huggingface_hub import list_repo_files

        return sorted(list_repo_files(op["repo"], revision=op.get("revision")))
    if kind == "download":
        from huggingface_hub import hf_hub_download

        return _sha(hf_hub_download(op["repo"], op["path"], revision=op.get("revision")))
    if kind == "snapshot":
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(op["repo"], revision=op.get("revision")))
        files = {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        config = folder / "adapter_config.json"
        return {"folder": folder.name, "files": files,
                "adapter_config": config.read_text() if config.exists() else None}
    if kind == "causal_lm":
        from transformers import AutoModelForCausalLM

        remote = AutoModelForCausalLM.from_pretrained(op["repo"], revision=op.get("revision"))
        local = AutoModelForCausalLM.from_pretrained(op["local"])
        return _compare(_logits(remote), _logits(local))
    if kind == "causal_lm_weights":
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        remote = AutoModelForCausalLM.from_pretrained(op["repo"], revision=op.get("revision")).state_dict()
        expected = load_file(op["expected"])
        assert set(expected) <= set(remote), sorted(set(expected) - set(remote))
        return max(float((remote[k] - t).abs().max()) for k, t in expected.items())
    if kind == "peft_auto":
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM

        remote = AutoPeftModelForCausalLM.from_pretrained(op["repo"], revision=op.get("revision"))
        cfg = remote.peft_config["default"]
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(op["local_base"]), op["local_adapter"])
        return {**_compare(_logits(remote), _logits(local)), "base": cfg.base_model_name_or_path,
                "base_revision": cfg.revision}
    if kind == "peft_on_base":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(op["base_repo"], revision=op.get("base_revision"))
        remote = PeftModel.from_pretrained(base, op["repo"], revision=op.get("revision"))
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(op["local_base"]), op["local_adapter"])
        return _compare(_logits(remote), _logits(local))
    if kind == "paths_info":
        from huggingface_hub import HfApi, RepoFile

        entries = HfApi().get_paths_info(op["repo"], op["paths"], revision=op.get("revision"),
                                         expand=op.get("expand", False))
        return [["file", e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None,
                 e.last_commit.oid if e.last_commit else None] if isinstance(e, RepoFile) else
                ["directory", e.path, None, e.tree_id, None, e.last_commit.oid if e.last_commit else None]
                for e in entries]
    if kind == "refs":
        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(op["repo"], include_pull_requests=op.get("include_prs", False))
        return {k: None if v is None else [[r.name, r.ref, r.target_commit] for r in v]
                for k, v in (("branches", refs.branches), ("tags", refs.tags), ("converts", refs.converts),
                             ("pull_requests", refs.pull_requests))}
    if kind == "fs":
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        root = f"{op['repo']}@{op['revision']}"
        target = f"{root}/{op['path']}"
        listing = sorted([e["name"], e["type"], e["size"]] for e in fs.ls(root, detail=True))
        first = fs.info(target)
        again = fs.info(target, refresh=True)  # HfFileSystem asks paths-info
        with fs.open(target, "rb") as f:
            whole = f.read()
        with fs.open(target, "rb", block_size=16) as f:
            f.seek(op["start"])
            part = f.read(op["length"])
        return {"ls": listing, "info": [first["name"], first["type"], first["size"]],
                "info_refreshed": [again["name"], again["type"], again["size"]],
                "exists": [fs.exists(target), fs.exists(target + ".nope")],
                "sha256": hashlib.sha256(whole).hexdigest(), "part": part.hex(),
                "cat_sha256": hashlib.sha256(fs.cat_file(target)).hexdigest()}
    raise ValueError(f"unknown op {kind!r}")


def main() -> None:
    out = []
    for op in json.loads(sys.argv[1]):
        try:
            out.append({"ok": run(op)})
        except Exception as e:  # reported to the test, which asserts on the class
            out.append({"error": type(e).__name__, "message": str(e)[-2000:], "trace": traceback.format_exc()[-3000:]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
