"""`registry export REF --oci DIR` / `registry import DIR`: an OCI image layout with the CNCF
ModelPack media types, checked by an off-the-shelf OCI tool (skopeo: it reads the layout and copies
it blob by blob, verifying every digest), and read back byte-exact; bad layouts are refused
without leaving a version or a draft."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from registry.client import InvalidInput
from registry.formats import oci

from .conftest import REQUIRE_SERVICES, Server


def _skopeo() -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        msg = "skopeo is not installed (apt-get install skopeo; .ci/run installs it)"
        if REQUIRE_SERVICES:
            pytest.fail(msg + " (REGISTRY_TEST_REQUIRE_SERVICES=1)")
        pytest.skip(msg)
    return exe


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _manifest(layout: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    return entry, json.loads(_blob(layout, entry["digest"]))


def _drafts(server: Server, model: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(server.database_url)
    try:
        with engine.connect() as c:
            return int(c.execute(text("select count(*) from drafts where model_name = :n"), {"n": model}).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def exported(sqlite_server: Server, demo: dict[str, Path], name: str, tmp_path: Path) -> tuple[Any, Any, Path]:
    """An adapter pinned to its base, with tags, exported into a layout by the CLI."""
    with sqlite_server.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        adapter = rc.push(demo["adapter-sql"], name, base=base.ref, tags={"task": "sql", "eval": "0.8"},
                          description="an adapter")
    layout = tmp_path / "layout"
    p = sqlite_server.cli("export", adapter.ref, "--oci", str(layout))
    assert p.stdout.strip().splitlines()[-1] == f"oci:{layout}:1"
    return base, adapter, layout


def test_export_writes_a_modelpack_layout(exported: tuple[Any, Any, Path]) -> None:
    base, adapter, layout = exported
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    entry, manifest = _manifest(layout)
    assert entry["mediaType"] == manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1"
    data = _blob(layout, entry["digest"])
    assert "sha256:" + hashlib.sha256(data).hexdigest() == entry["digest"] and len(data) == entry["size"]
    assert manifest["schemaVersion"] == 2
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    # one raw layer per file: the blob is the file, its digest the file's sha256, its path annotated
    layers = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in manifest["layers"]}
    assert set(layers) == {f.path for f in adapter.files}
    for f in adapter.files:
        layer = layers[f.path]
        assert layer["digest"] == f"sha256:{f.sha256}" and layer["size"] == f.size
        assert hashlib.sha256(_blob(layout, layer["digest"])).hexdigest() == f.sha256
        assert layer["annotations"]["org.opencontainers.image.title"] == f.path
    assert layers["adapter_model.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert layers["adapter_config.json"]["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"
    # the ModelPack config: only the fields its schema allows; modelfs lists the layers' content
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    assert set(config) == {"descriptor", "config", "modelfs"}
    assert config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"] for layer in manifest["layers"]]}
    assert config["descriptor"]["name"] == adapter.model and config["descriptor"]["version"] == "1"
    assert config["descriptor"]["revision"] == adapter.content_sha256
    assert config["descriptor"]["description"] == "an adapter" and config["config"] == {"format": "safetensors"}
    assert set(config["descriptor"]) <= {"createdAt", "authors", "family", "name", "docURL", "sourceURL",
                                         "datasetsURL", "version", "revision", "vendor", "licenses", "title",
                                         "description"}
    # the registry's own metadata: annotations on the manifest
    notes = manifest["annotations"]
    assert notes["io.registry.kind"] == "adapter" and notes["io.registry.base"] == base.ref
    assert json.loads(notes["io.registry.tags"]) == {"task": "sql", "eval": "0.8"}
    assert json.loads(notes["io.registry.parents"]) == [{"ref": base.ref, "relation": "adapter_of", "params": {}}]


def test_skopeo_reads_and_copies_the_layout(exported: tuple[Any, Any, Path], tmp_path: Path) -> None:
    skopeo = _skopeo()
    _, _, layout = exported
    entry, _ = _manifest(layout)
    raw = subprocess.run([skopeo, "inspect", "--raw", f"oci:{layout}:1"], capture_output=True, check=True).stdout
    assert raw == _blob(layout, entry["digest"])
    copy = tmp_path / "copy"
    subprocess.run([skopeo, "copy", f"oci:{layout}:1", f"oci:{copy}:1"], capture_output=True, check=True)
    copied_entry, _ = _manifest(copy)
    assert copied_entry["digest"] == entry["digest"]  # the same manifest: every blob copied byte for byte
    damaged = tmp_path / "damaged"
    shutil.copytree(layout, damaged)
    _, manifest = _manifest(damaged)
    weights = next(layer for layer in manifest["layers"] if layer["mediaType"].endswith("weight.v1.raw"))
    blob = damaged / "blobs" / "sha256" / weights["digest"].removeprefix("sha256:")
    blob.write_bytes(b"\0" * blob.stat().st_size)
    bad = subprocess.run([skopeo, "copy", f"oci:{damaged}:1", f"oci:{tmp_path / 'copy2'}:1"], capture_output=True)
    assert bad.returncode != 0  # skopeo checks the digests it copies: a damaged layout is no valid layout


def test_import_is_byte_exact(sqlite_server: Server, exported: tuple[Any, Any, Path], demo: dict[str, Path],
                              name: str, tmp_path: Path) -> None:
    base, adapter, layout = exported
    source = layout
    if shutil.which("skopeo"):  # import what an OCI tool wrote, not only what we wrote
        source = tmp_path / "via-skopeo"
        subprocess.run(["skopeo", "copy", f"oci:{layout}:1", f"oci:{source}:1"], capture_output=True, check=True)
    p = sqlite_server.cli("import", str(source), "--name", f"{name}-copy", "--json")
    imported = json.loads(p.stdout)
    assert imported["ref"] == f"{name}-copy@1" and imported["content_sha256"] == adapter.content_sha256
    assert {(f["path"], f["sha256"], f["size"]) for f in imported["files"]} == {
        (f.path, f.sha256, f.size) for f in adapter.files}
    assert imported["kind"] == "adapter" and imported["base"] == base.ref and imported["description"] == "an adapter"
    assert imported["tags"] == {"task": "sql", "eval": "0.8"}
    assert [(x["ref"], x["relation"]) for x in imported["parents"]] == [(base.ref, "adapter_of")]
    with sqlite_server.client() as rc:
        rc.pull(imported["ref"], tmp_path / "pulled")
        # the same version again is a duplicate (versions are immutable): 409, exit 5
        again = sqlite_server.cli("import", str(source), "--name", f"{name}-copy", check=False)
        assert again.returncode == 5 and "duplicate_content" in again.stderr
        # without the exported lineage an adapter needs a base of this registry's (--base)
        with pytest.raises(InvalidInput) as e:
            rc.import_oci(source, name=f"{name}-bare", lineage=False)
        assert e.value.code == "base_required" and rc.search_versions(prefix=f"{name}-bare").items == []
        other_base = rc.push(demo["base"], f"{name}-other-base")
        rebased = rc.import_oci(source, name=f"{name}-bare", lineage=False, base=other_base.ref)
    for f in adapter.files:
        assert hashlib.sha256((tmp_path / "pulled" / f.path).read_bytes()).hexdigest() == f.sha256
    assert rebased.base == other_base.ref and rebased.content_sha256 == adapter.content_sha256
    assert [(x.ref, x.relation) for x in rebased.parents] == [(other_base.ref, "adapter_of")]


def test_bad_layouts_are_refused_and_leave_nothing(sqlite_server: Server, exported: tuple[Any, Any, Path],
                                                  name: str, tmp_path: Path) -> None:
    _, _, layout = exported

    def variant(label: str) -> Path:
        out = tmp_path / label
        shutil.copytree(layout, out)
        return out

    def edit_manifest(root: Path, change: Any) -> None:
        entry, manifest = _manifest(root)
        change(manifest)
        data = oci.canonical(manifest)
        sha = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256" / sha).write_bytes(data)
        index = json.loads((root / "index.json").read_text())
        index["manifests"][0].update(digest=f"sha256:{sha}", size=len(data))
        (root / "index.json").write_text(json.dumps(index))

    not_layout = tmp_path / "plain"
    not_layout.mkdir()
    (not_layout / "x.txt").write_text("hi")
    tampered = variant("tampered")  # a layer's bytes changed, its digest not (the server holds the right ones)
    _, manifest = _manifest(tampered)
    weights = next(x for x in manifest["layers"] if x["mediaType"].endswith("weight.v1.raw"))
    blob = tampered / "blobs" / "sha256" / weights["digest"].removeprefix("sha256:")
    blob.chmod(0o644)
    blob.write_bytes(b"\1" * blob.stat().st_size)
    missing = variant("missing")
    (missing / "blobs" / "sha256" / weights["digest"].removeprefix("sha256:")).unlink()
    tar = variant("tar")
    edit_manifest(tar, lambda m: m["layers"][0].update(mediaType="application/vnd.cncf.model.weight.v1.tar"))
    nopath = variant("nopath")
    edit_manifest(nopath, lambda m: m["layers"][0].update(annotations={}))
    unsafe = variant("unsafe")
    edit_manifest(unsafe, lambda m: m["layers"][0]["annotations"].update({"org.cncf.model.filepath": "../escape"}))
    foreign = variant("foreign")
    edit_manifest(foreign, lambda m: (m.pop("artifactType"), m["config"].update(
        mediaType="application/vnd.oci.image.config.v1+json")))
    two = variant("two")
    index = json.loads((two / "index.json").read_text())
    index["manifests"].append({**index["manifests"][0], "annotations": {"org.opencontainers.image.ref.name": "2"}})
    (two / "index.json").write_text(json.dumps(index))
    bad_index = variant("bad-index")
    (bad_index / "index.json").write_text("{not json")

    cases = [(not_layout, 4, "not an OCI image layout"), (tampered, 4, "does not match its digest"),
             (missing, 4, "missing"), (tar, 4, "only raw ModelPack layers"), (nopath, 4, "org.cncf.model.filepath"),
             (unsafe, 4, "unsafe_path"), (foreign, 4, "not a ModelPack model artifact"),
             (two, 4, "pick one with a tag"), (bad_index, 4, "not JSON")]
    for i, (src, code, says) in enumerate(cases):
        model = f"{name}-bad-{i}"
        p = sqlite_server.cli("import", str(src), "--name", model, "--json", check=False)
        assert p.returncode == code, (src.name, p.returncode, p.stderr)
        err = json.loads(p.stderr.strip().splitlines()[-1])["error"]
        assert says in err["message"] or says == err["code"], (src.name, p.stderr)
        with sqlite_server.client() as rc:
            assert rc.search_versions(prefix=model).items == []
        assert _drafts(sqlite_server, model) == 0, src.name
    # two manifests: --tag picks one
    picked = sqlite_server.cli("import", str(two), "--name", f"{name}-picked", "--tag", "2")
    assert picked.stdout.strip().splitlines()[-1] == f"{name}-picked@1"

    # export refuses a folder that holds something else, and a layout of another model
    refused = sqlite_server.cli("export", f"{name}-base@1", "--oci", str(not_layout), check=False)
    assert refused.returncode == 4 and "not empty" in refused.stderr
    other = sqlite_server.cli("export", f"{name}-base@1", "--oci", str(layout), check=False)
    assert other.returncode == 4 and "holds versions of" in other.stderr
    # ... but adds another version of the same model to its own layout
    with sqlite_server.client() as rc:
        rc.set_tags(f"{name}@1", {"extra": "1"})
    again = sqlite_server.cli("export", f"{name}@1", "--oci", str(layout), "--json")
    assert json.loads(again.stdout)["tag"] == "1"
    assert len(json.loads((layout / "index.json").read_text())["manifests"]) == 1  # tag 1 replaced, not doubled
