"""OCI image layouts of registry versions, with the CNCF ModelPack media types.

A version is written as an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``)
holding one OCI image manifest per version, tagged with its version number
(``org.opencontainers.image.ref.name``), so standard tools push it to any OCI registry
(``skopeo copy oci:DIR:1 docker://host/repo:1``, ``oras cp``):

- ``artifactType`` ``application/vnd.cncf.model.manifest.v1+json``;
- the config, ``application/vnd.cncf.model.config.v1+json``: ModelPack's ``descriptor`` (name,
  version, description, createdAt, authors, revision = the version's content sha256), ``config``
  (``format``) and ``modelfs`` (``type: layers``, ``diffIds`` = the layer digests: raw layers are
  their own uncompressed content). The ModelPack config schema allows no other fields, so the
  registry's own metadata goes into the manifest's annotations: ``io.registry.ref``, ``.kind``,
  ``.base``, ``.tags`` (JSON), ``.parents`` (JSON lineage edges), ``.content_sha256``;
- one *raw* layer per file (``application/vnd.cncf.model.weight.v1.raw`` for weights,
  ``…weight.config.v1.raw`` for configs and tokenizers, ``…doc.v1.raw``, ``…code.v1.raw``): its
  blob is the file itself, so a layer's digest is the file's sha256; the path is in the layer
  annotations ``org.cncf.model.filepath`` (ModelPack) and ``org.opencontainers.image.title`` (what
  ``oras pull`` names the file).

:func:`read` takes such a layout back (any ModelPack artifact with raw layers); tar layers are
refused. A layout holds versions of one model.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
CODE = "application/vnd.cncf.model.code.v1.raw"
DATASET = "application/vnd.cncf.model.dataset.v1.raw"
RAW_LAYER_TYPES = (WEIGHT, WEIGHT_CONFIG, DOC, CODE, DATASET)
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
LAYOUT_VERSION = "1.0.0"
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
PREFIX = "io.registry."  # the registry's own manifest annotations

WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack",
                             ".npz", ".npy", ".tflite", ".pb"})
CODE_SUFFIXES = frozenset({".py", ".sh", ".ipynb", ".js", ".cc", ".cpp", ".c", ".h", ".cu"})
DOC_SUFFIXES = frozenset({".md", ".rst", ".pdf"})
DOC_STEMS = ("readme", "license", "licence", "notice", "model_card", "modelcard")


class LayoutError(ValueError):
    """The folder is not an OCI image layout this module can read or add to."""


class FileMeta(BaseModel):
    path: str
    sha256: str
    size: int


class VersionMeta(BaseModel):
    """What a layout carries about a version besides its files."""

    ref: str
    name: str
    version: int
    kind: str | None = None
    base: str | None = None
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    parents: list[dict[str, Any]] = Field(default_factory=list)
    content_sha256: str | None = None
    created_at: datetime | None = None
    created_by: str | None = None
    files: list[FileMeta] = Field(default_factory=list)


class OciExport(BaseModel):
    """A version written into a layout."""

    path: str
    ref: str
    tag: str
    manifest_digest: str
    files: int
    size: int


class Layer(BaseModel):
    path: str
    sha256: str
    size: int
    media_type: str
    blob: Path


class Artifact(BaseModel):
    """A model read from a layout: its metadata and where each file's bytes are."""

    meta: VersionMeta
    manifest_digest: str
    layers: list[Layer]


def layer_media_type(path: str) -> str:
    """The ModelPack raw layer type of a file, by its name."""
    p = PurePosixPath(path)
    suffix = p.suffix.lower()
    if suffix in WEIGHT_SUFFIXES:
        return WEIGHT
    if suffix in CODE_SUFFIXES:
        return CODE
    if suffix in DOC_SUFFIXES or p.name.lower().startswith(DOC_STEMS):
        return DOC
    return WEIGHT_CONFIG


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(sha256: str) -> str:
    return f"sha256:{sha256}"


def _rfc3339(t: datetime | None) -> str | None:
    if t is None:
        return None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise LayoutError(f"{path.parent}: not an OCI image layout (no {path.name})") from None
    except ValueError as e:
        raise LayoutError(f"{path}: {what} is not JSON ({e})") from None


class Layout:
    """An OCI image layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def _index(self) -> dict[str, Any]:
        index = self.root / "index.json"
        if not index.exists():
            return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
        doc = _load_json(index, "index.json")
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise LayoutError(f"{index}: not an OCI image index")
        return doc

    def create(self) -> None:
        """Make ``root`` a layout: a new or empty folder, or an existing layout (added to)."""
        if self.root.exists():
            if not self.root.is_dir():
                raise LayoutError(f"{self.root}: not a directory")
            if any(self.root.iterdir()) and not (self.root / "oci-layout").exists():
                raise LayoutError(f"{self.root}: not empty and not an OCI image layout")
            self._check_layout_file()
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / "oci-layout", canonical({"imageLayoutVersion": LAYOUT_VERSION}))

    def _check_layout_file(self) -> None:
        marker = self.root / "oci-layout"
        if marker.exists():
            doc = _load_json(marker, "oci-layout")
            if not isinstance(doc, dict) or doc.get("imageLayoutVersion") != LAYOUT_VERSION:
                raise LayoutError(f"{marker}: unsupported imageLayoutVersion {doc!r}")

    def _put(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        _write_atomic(self.blob_path(sha), data)
        return _digest(sha), len(data)

    def write(self, meta: VersionMeta) -> OciExport:
        """Write the config and manifest of ``meta`` (whose files' blobs must already be in
        place) and point the index's tag ``meta.version`` at it."""
        for f in meta.files:
            blob = self.blob_path(f.sha256)
            if not blob.exists() or blob.stat().st_size != f.size:
                raise LayoutError(f"blob of {f.path} ({f.sha256}) is missing from {self.root}")
        layers = [{"mediaType": layer_media_type(f.path), "digest": _digest(f.sha256), "size": f.size,
                   "annotations": {FILEPATH: f.path, TITLE: f.path}} for f in meta.files]
        descriptor: dict[str, Any] = {"name": meta.name, "version": str(meta.version)}
        if meta.description:
            descriptor["description"] = meta.description
        if meta.created_at is not None:
            descriptor["createdAt"] = _rfc3339(meta.created_at)
        if meta.created_by:
            descriptor["authors"] = [meta.created_by]
        if meta.content_sha256:
            descriptor["revision"] = meta.content_sha256
        model_config: dict[str, Any] = {}
        if any(f.path.endswith(".safetensors") for f in meta.files):
            model_config["format"] = "safetensors"
        config = {"descriptor": descriptor, "config": model_config,
                  "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]}}
        config_digest, config_size = self._put(canonical(config))
        annotations = {
            "org.opencontainers.image.title": meta.name, "org.opencontainers.image.version": str(meta.version),
            PREFIX + "ref": meta.ref, PREFIX + "tags": canonical(meta.tags).decode(),
            PREFIX + "parents": canonical(meta.parents).decode()}
        optional = {"org.opencontainers.image.created": _rfc3339(meta.created_at),
                    "org.opencontainers.image.description": meta.description or None,
                    PREFIX + "kind": meta.kind, PREFIX + "base": meta.base,
                    PREFIX + "content_sha256": meta.content_sha256}
        annotations.update({k: v for k, v in optional.items() if v})
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                    "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size},
                    "layers": layers, "annotations": annotations}
        manifest_digest, manifest_size = self._put(canonical(manifest))
        tag = str(meta.version)
        index = self._index()
        for m in index["manifests"]:
            other = (m.get("annotations") or {}).get(TITLE)
            if other not in (None, meta.name):
                raise LayoutError(f"{self.root} holds versions of {other!r}, not {meta.name!r}: export into "
                                  "another folder")
        index["manifests"] = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != tag]
        index["manifests"].append({"mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                                   "digest": manifest_digest, "size": manifest_size,
                                   "annotations": {REF_NAME: tag, TITLE: meta.name}})
        _write_atomic(self.root / "index.json", canonical(index))
        return OciExport(path=str(self.root), ref=meta.ref, tag=tag, manifest_digest=manifest_digest,
                         files=len(meta.files), size=sum(f.size for f in meta.files))

    def blob(self, descriptor: Any, what: str) -> bytes:
        """The bytes of a small blob (manifest, config), checked against its descriptor."""
        sha, size = self._descriptor(descriptor, what)
        path = self.blob_path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LayoutError(f"{what} blob {sha} is missing from {self.root}") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise LayoutError(f"{what} blob {sha} does not match its digest and size")
        return data

    @staticmethod
    def _descriptor(d: Any, what: str) -> tuple[str, int]:
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("size"), int):
            raise LayoutError(f"{what}: not an OCI descriptor (digest, size)")
        algo, _, sha = d["digest"].partition(":")
        if algo != "sha256" or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise LayoutError(f"{what}: unsupported digest {d['digest']!r} (sha256 only)")
        if d["size"] < 0:
            raise LayoutError(f"{what}: negative size")
        return sha, d["size"]


def read(root: Path, tag: str | None = None) -> Artifact:
    """The model of layout ``root`` (the manifest tagged ``tag``; the only one when None)."""
    layout = Layout(root)
    if not (layout.root / "oci-layout").exists():
        raise LayoutError(f"{layout.root}: not an OCI image layout (no oci-layout file)")
    layout._check_layout_file()
    manifests = layout._index()["manifests"]
    if tag is not None:
        manifests = [m for m in manifests if isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME) == tag]
    if len(manifests) != 1:
        tags = sorted(str((m.get("annotations") or {}).get(REF_NAME)) for m in layout._index()["manifests"]
                      if isinstance(m, dict))
        which = f"no manifest tagged {tag!r}" if tag is not None else f"{len(manifests)} manifests"
        raise LayoutError(f"{layout.root}: {which} (tags: {', '.join(tags) or 'none'}); pick one with a tag")
    entry = manifests[0]
    data = layout.blob(entry, "manifest")
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("mediaType", MANIFEST_MEDIA_TYPE) != MANIFEST_MEDIA_TYPE:
        raise LayoutError("the manifest is not an OCI image manifest")
    config_desc = manifest.get("config") or {}
    if manifest.get("artifactType") != ARTIFACT_TYPE and config_desc.get("mediaType") != CONFIG_MEDIA_TYPE:
        raise LayoutError(f"not a ModelPack model artifact (artifactType {manifest.get('artifactType')!r})")
    try:
        config = json.loads(layout.blob(config_desc, "config"))
    except ValueError as e:
        raise LayoutError(f"the config blob is not JSON ({e})") from None
    descriptor = (config.get("descriptor") if isinstance(config, dict) else None) or {}
    notes = manifest.get("annotations") or {}
    layers: list[Layer] = []
    seen: set[str] = set()
    for i, d in enumerate(manifest.get("layers") or []):
        sha, size = layout._descriptor(d, f"layer {i}")
        media = d.get("mediaType")
        if media not in RAW_LAYER_TYPES:
            raise LayoutError(f"layer {i} has media type {media!r}: only raw ModelPack layers "
                              f"({', '.join(RAW_LAYER_TYPES)}) can be imported")
        path = (d.get("annotations") or {}).get(FILEPATH) or (d.get("annotations") or {}).get(TITLE)
        if not isinstance(path, str) or not path:
            raise LayoutError(f"layer {i} has no {FILEPATH} annotation")
        if path in seen:
            raise LayoutError(f"two layers hold {path!r}")
        seen.add(path)
        blob = layout.blob_path(sha)
        if not blob.is_file() or blob.stat().st_size != size:
            raise LayoutError(f"the blob of {path} ({sha}, {size} bytes) is missing or has another size")
        layers.append(Layer(path=path, sha256=sha, size=size, media_type=media, blob=blob))
    if not layers:
        raise LayoutError("the manifest has no layers: nothing to import")

    def loads(key: str, default: Any) -> Any:
        try:
            return json.loads(notes[PREFIX + key]) if PREFIX + key in notes else default
        except ValueError:
            raise LayoutError(f"annotation {PREFIX + key} is not JSON") from None

    name = notes.get("org.opencontainers.image.title") or descriptor.get("name")
    if not isinstance(name, str) or not name:
        raise LayoutError("the artifact names no model (org.opencontainers.image.title or descriptor.name)")
    version = str(notes.get("org.opencontainers.image.version") or descriptor.get("version") or "0")
    meta = VersionMeta(
        ref=notes.get(PREFIX + "ref") or f"{name}@{version}", name=name,
        version=int(version) if version.isdigit() else 0, kind=notes.get(PREFIX + "kind"),
        base=notes.get(PREFIX + "base"), description=str(descriptor.get("description") or ""),
        tags=loads("tags", {}), parents=loads("parents", []), content_sha256=notes.get(PREFIX + "content_sha256"),
        created_by=(descriptor.get("authors") or [None])[0],
        files=[FileMeta(path=layer.path, sha256=layer.sha256, size=layer.size) for layer in layers])
    return Artifact(meta=meta, manifest_digest=entry["digest"], layers=layers)
