"""What a set of files is: weights, sharded index, adapter, config; fingerprint and summary.

:func:`inspect_file` runs as soon as one file has arrived (fast failure on a corrupt upload);
:func:`inspect_version` runs at commit over every file of the version, checks cross-file
consistency for the version's kind, and returns the tensor index, fingerprint and summary the
registry stores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput
from . import jsonfile, peft
from .safetensors import SafetensorsHeader, check_stream, parse_header

ADAPTER_CONFIG = peft.ADAPTER_CONFIG_NAME
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_JSON_BYTES = 64 << 20


@dataclass
class FileSource:
    """One file of a version, wherever its bytes are (staging area or blob store)."""

    path: str
    sha256: str
    size: int
    read_at: Callable[[int, int], bytes]
    iter_bytes: Callable[[], Iterable[bytes]]
    # False when the bytes were already scanned (on arrival, or at an earlier ingest of the blob).
    needs_scan: bool = True

    def read_all(self, limit: int = MAX_JSON_BYTES) -> bytes:
        if self.size > limit:
            raise InvalidInput(f"{self.path}: {self.size} bytes is too large for a JSON file",
                               code="invalid_file", details={"file": self.path})
        return self.read_at(0, self.size)


def is_weights(path: str) -> bool:
    return path.endswith(".safetensors")


def is_index(path: str) -> bool:
    return path.endswith(".safetensors.index.json")


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def check_single_file(src: FileSource, *, max_header_bytes: int, check_finite: bool,
                      streamed: tuple[SafetensorsHeader, list[str]] | None = None) -> SafetensorsHeader | None:
    """Validate one file on arrival: safetensors header and NaN/Inf scan (``streamed`` carries
    the result when the bytes were checked as they arrived), JSON syntax of indexes and adapter
    configs, and refusal of pickled weights."""
    if is_pickle(src.path):
        raise InvalidInput(f"{src.path}: pickled weights are refused (they can run code when loaded); "
                           "convert them to safetensors", code="unsafe_format", details={"file": src.path})
    if is_weights(src.path):
        if streamed is None:
            streamed = check_stream(src.iter_bytes(), file=src.path, max_header_bytes=max_header_bytes,
                                    check_finite=check_finite)
        header, bad = streamed
        if bad:
            raise InvalidInput(f"{src.path}: tensors hold NaN or Inf values: {', '.join(bad[:10])}",
                               code="non_finite", details={"file": src.path, "tensors": bad})
        return header
    if is_index(src.path) or src.path.endswith(ADAPTER_CONFIG):
        _load_json(src)
    return None


def _load_json(src: FileSource) -> Any:
    return jsonfile.loads(src.read_all(), file=src.path)


@dataclass
class Inspection:
    kind: str
    tensor_index: dict[str, list[Any]] = field(default_factory=dict)  # name -> [dtype, shape, file]
    fingerprint: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    adapter: peft.AdapterSpec | None = None


def fingerprint(tensor_index: Mapping[str, list[Any]]) -> str:
    """sha256 of the sorted (name, dtype, shape) triples: equal for checkpoints of one architecture."""
    canon = [[name, v[0], list(v[1])] for name, v in sorted(tensor_index.items())]
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()


def content_hash(files: Mapping[str, str]) -> str:
    """sha256 over the sorted ``path -> sha256`` manifest: equal iff two versions hold the same files."""
    h = hashlib.sha256()
    for path, sha in sorted(files.items()):
        h.update(f"{path}\0{sha}\n".encode())
    return h.hexdigest()


SAMPLE_BLOCKS = 16  # blocks a sample digest reads, spread evenly over the file
SAMPLE_BLOCK_BYTES = 4096


def sample_digest(read_at: Callable[[int, int], bytes], size: int) -> str:
    """sha256 over a file's size and :data:`SAMPLE_BLOCKS` blocks spread over it (first and last
    included): a few KiB read from anywhere that tell two files of one size apart almost always.
    Equal files have equal samples, so a sample no stored file of that size shares proves the
    bytes new (a push then uploads at once, hashing while it sends); equal samples prove nothing."""
    h = hashlib.sha256(size.to_bytes(8, "little"))
    if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        h.update(read_at(0, size))
        return h.hexdigest()
    last = size - SAMPLE_BLOCK_BYTES
    for i in range(SAMPLE_BLOCKS):
        h.update(read_at(last * i // (SAMPLE_BLOCKS - 1), SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def infer_kind(paths: list[str], has_base: bool) -> str:
    if any(p == ADAPTER_CONFIG or p.endswith("/" + ADAPTER_CONFIG) for p in paths):
        return "adapter"
    return "finetune" if has_base else "base"


def inspect_version(kind: str, files: dict[str, FileSource], *, max_header_bytes: int,
                    check_finite: bool) -> Inspection:
    """Validate the files of one version as a whole and describe its weights."""
    for src in files.values():
        if is_pickle(src.path):
            check_single_file(src, max_header_bytes=max_header_bytes, check_finite=False)
    headers: dict[str, SafetensorsHeader] = {}
    for path, src in files.items():
        if is_weights(path):
            headers[path] = parse_header(src.read_at, src.size, file=path, max_header_bytes=max_header_bytes)
            if check_finite and src.needs_scan:
                check_single_file(src, max_header_bytes=max_header_bytes, check_finite=True)

    insp = Inspection(kind=kind)
    if kind == "adapter":
        _inspect_adapter(insp, files, headers)
    else:
        _inspect_checkpoint(insp, files, headers)
    insp.fingerprint = fingerprint(insp.tensor_index) if insp.tensor_index else None
    return insp


def _inspect_checkpoint(insp: Inspection, files: dict[str, FileSource],
                        headers: dict[str, SafetensorsHeader]) -> None:
    if not headers:
        raise InvalidInput(f"a {insp.kind} version needs safetensors weights; none among "
                           f"{sorted(files)[:20]}", code="missing_weights")
    index_files = [p for p in files if is_index(p)]
    index: dict[str, list[Any]] = {}
    for path, h in sorted(headers.items()):
        for name, t in h.tensors.items():
            if name in index:
                raise InvalidInput(f"tensor {name!r} appears in both {index[name][2]} and {path}",
                                   code="duplicate_tensor", details={"tensor": name, "files": [index[name][2], path]})
            index[name] = [t.dtype, list(t.shape), path]
    for ipath in index_files:
        _check_index(ipath, _load_json(files[ipath]), headers)
    insp.tensor_index = index
    dtypes: dict[str, int] = {}
    params = 0
    for dtype, shape, _ in index.values():
        n = 1
        for d in shape:
            n *= d
        params += n
        dtypes[dtype] = dtypes.get(dtype, 0) + n
    insp.summary = {"tensors": len(index), "parameters": params, "dtypes": dtypes,
                    "weight_files": len(headers), "sharded": bool(index_files)}


def _check_index(ipath: str, obj: Any, headers: dict[str, SafetensorsHeader]) -> None:
    def bad(reason: str, **details: Any) -> InvalidInput:
        return InvalidInput(f"{ipath}: {reason}", code="invalid_index", details={"file": ipath, **details})

    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise bad("must be a JSON object with a 'weight_map' object")
    folder = ipath.rsplit("/", 1)[0] + "/" if "/" in ipath else ""
    wmap: dict[str, Any] = obj["weight_map"]
    shards: dict[str, set[str]] = {}
    for tensor, shard in wmap.items():
        if not isinstance(shard, str):
            raise bad(f"weight_map[{tensor!r}] must be a file name")
        shards.setdefault(folder + shard, set()).add(tensor)
    missing_files = sorted(s for s in shards if s not in headers)
    if missing_files:
        raise bad(f"shards listed in the index are missing: {missing_files[:10]}", missing=missing_files)
    for shard, names in shards.items():
        present = set(headers[shard].tensors)
        absent = sorted(names - present)
        extra = sorted(present - names)
        if absent or extra:
            raise bad(f"{shard} does not match the index (missing {absent[:5]}, unlisted {extra[:5]})",
                      shard=shard, missing=absent, unlisted=extra)


def _inspect_adapter(insp: Inspection, files: dict[str, FileSource],
                     headers: dict[str, SafetensorsHeader]) -> None:
    cfg_paths = [p for p in files if p.rsplit("/", 1)[-1] == ADAPTER_CONFIG]
    if not cfg_paths:
        raise InvalidInput("an adapter version needs adapter_config.json (PEFT layout)",
                           code="missing_adapter_config")
    if len(cfg_paths) > 1:
        raise InvalidInput(f"one adapter per version: several adapter_config.json found {cfg_paths}",
                           code="invalid_adapter")
    cfg_path = cfg_paths[0]
    folder = cfg_path[: -len(ADAPTER_CONFIG)]
    weights_path = folder + ADAPTER_WEIGHTS
    if weights_path not in headers:
        raise InvalidInput(f"an adapter version needs {weights_path} beside {cfg_path}",
                           code="missing_weights")
    config = peft.parse_config(files[cfg_path].read_all(), cfg_path)
    spec = peft.parse_adapter(config, headers[weights_path].tensors, weights_path)
    insp.adapter = spec
    insp.tensor_index = {n: [t.dtype, list(t.shape), weights_path] for n, t in headers[weights_path].tensors.items()}
    insp.summary = {**spec.summary(), "tensors": len(insp.tensor_index),
                    "parameters": sum(t.numel for t in headers[weights_path].tensors.values())}


def check_finetune_against_base(index: dict[str, list[Any]], base_index: dict[str, Any]) -> list[dict[str, Any]]:
    """A fine-tune must have the base's tensors with the base's shapes; the first dimension may
    grow (vocabulary added to embeddings / lm_head)."""
    problems: list[dict[str, Any]] = []
    for name in sorted(set(index) | set(base_index)):
        if name not in base_index:
            problems.append({"key": name, "problem": "not in the base"})
        elif name not in index:
            problems.append({"key": name, "problem": "missing from the fine-tune"})
        else:
            s, b = list(index[name][1]), list(base_index[name][1])
            if s != b and not (len(s) == len(b) and len(s) >= 1 and s[1:] == b[1:] and s[0] > b[0]):
                problems.append({"key": name, "problem": "shape mismatch", "shape": s, "base_shape": b})
    return problems
