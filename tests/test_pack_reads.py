"""Damaged bytes of a packed (or about to be packed) file are never served as the file, and never
packed: against a real server's registry, damage made on disk by hand.

- A payload damaged so that it still decodes and keeps its CRC-32 (the one damage a frame's own
  check cannot see): a whole-file download is hashed by the integrity layer and cut before it
  completes, a range is checked chunk by chunk (sha256) and refused; either marks the version
  corrupt.
- A raw object damaged before its pack: the pack fails, the file stays raw.
- A stored chunk damaged before another file reuses it: the pack of that file fails, it stays raw
  and downloads byte-exact.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select

from registry.client import Version
from registry.models import Blob, BlobSegment, Chunk
from registry.services import content, packing
from registry.services.context import RegistryContext
from registry.weights import packing as codec

from .conftest import Server


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randint(0, 256, (1 << 16,), generator=g, dtype=torch.uint8),  # incompressible: kept raw
            "w": (torch.randn(512, 512, generator=g) * 0.02).to(torch.bfloat16)}


def _push(server: Server, name: str, folder: Path, tensors: dict[str, torch.Tensor],
          metadata: dict[str, str] | None = None) -> tuple[Version, bytes]:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    with server.client() as rc:
        v = rc.push(folder, name, kind="base")
    return v, (folder / "model.safetensors").read_bytes()


def _url(server: Server, name: str) -> str:
    return f"{server.url}/api/v1/models/{name}/versions/1/files/model.safetensors"


def _payload_path(server_ctx: RegistryContext, sha: str, dtype: str) -> tuple[Path, int, int]:
    """The store file of the payload of the first ``dtype`` tensor's chunk of file ``sha``, and
    that segment's offset and length."""
    with server_ctx.db.read() as s:
        obj, offset, length = s.execute(
            select(Chunk.object_sha256, BlobSegment.offset, BlobSegment.length)
            .join(Chunk, Chunk.sha256 == BlobSegment.chunk_sha256)
            .where(BlobSegment.blob_sha256 == sha, BlobSegment.key.like(f"{dtype}|%"))
            .order_by(BlobSegment.offset)).first()
    path = server_ctx.store.local_path(obj)
    assert path is not None
    return path, int(offset), int(length)


def _crc_keeping(data: bytes, damage_at: int, patch_at: int) -> bytes:
    """``data`` with one byte flipped at ``damage_at`` and the 4 bytes at ``patch_at`` set so that
    the CRC-32 stays what it was (CRC-32 is affine over GF(2): solve for the 32 patch bits)."""
    out = bytearray(data)
    out[damage_at] ^= 0xFF

    def delta(pos: int, bit: int) -> int:  # how flipping one bit at pos changes the CRC
        probe = bytearray(len(data))
        probe[pos] = 1 << bit
        return zlib.crc32(bytes(probe)) ^ zlib.crc32(bytes(len(data)))

    want = zlib.crc32(bytes(out)) ^ zlib.crc32(data)  # the change to undo
    rows = [(delta(patch_at + k // 8, k % 8), 1 << k) for k in range(32)]  # (effect, which patch bits)
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (effect, patch bits), Gaussian elimination
    for eff, bits in rows:
        for lead in sorted(basis, reverse=True):
            if eff >> lead & 1:
                eff, bits = eff ^ basis[lead][0], bits ^ basis[lead][1]
        if eff:
            basis[eff.bit_length() - 1] = (eff, bits)
    patch = 0
    for lead in sorted(basis, reverse=True):
        if want >> lead & 1:
            want, patch = want ^ basis[lead][0], patch ^ basis[lead][1]
    assert want == 0, "4 consecutive bytes always reach every CRC-32"
    for k in range(4):
        out[patch_at + k] ^= patch >> (8 * k) & 0xFF
    assert zlib.crc32(bytes(out)) == zlib.crc32(data) and bytes(out) != data
    return bytes(out)


def _damage_keeping_crc(server_ctx: RegistryContext, sha: str) -> tuple[int, int]:
    """Damage the raw-coded payload of the file's U8 tensor so that it still decodes, to other
    bytes with the same CRC-32. Returns the damaged segment's offset and length."""
    path, offset, length = _payload_path(server_ctx, sha, "U8")
    payload = path.read_bytes()
    body = len(payload) - length  # a raw payload ends with the segment's bytes
    assert codec.decode(payload) and not codec.needs_reference(payload)
    damaged = _crc_keeping(payload, body + 100, body + 200)
    decoded = codec.decode(damaged)  # passes its own check ...
    assert hashlib.sha256(decoded).digest() != hashlib.sha256(codec.decode(payload)).digest()  # ... yet is wrong
    path.write_bytes(damaged)
    return offset, length


def _corrupt(server: Server, ref: str) -> bool:
    with server.client() as rc:
        return rc.get_version(ref).corrupt


def test_a_whole_download_hashes_what_the_crc_cannot_see(server: Server, server_ctx: RegistryContext, name: str,
                                                          tmp_path: Path) -> None:
    v, data = _push(server, name, tmp_path / "m", _tensors(1))
    sha = hashlib.sha256(data).hexdigest()
    packing.pack_version(server_ctx, v.id)
    assert content.is_packed(server_ctx, sha)
    assert httpx.get(_url(server, name)).content == data
    _damage_keeping_crc(server_ctx, sha)
    got = b""
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", _url(server, name), timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            got += chunk
    assert len(got) < len(data)  # cut before it completed: never a complete-looking wrong body
    assert _corrupt(server, v.ref)


def test_a_range_checks_each_chunk_it_serves(server: Server, server_ctx: RegistryContext, name: str,
                                             tmp_path: Path) -> None:
    v, data = _push(server, name, tmp_path / "m", _tensors(2))
    sha = hashlib.sha256(data).hexdigest()
    packing.pack_version(server_ctx, v.id)
    offset, length = _damage_keeping_crc(server_ctx, sha)
    header = {"Range": f"bytes={offset + 50}-{offset + 300}"}
    try:
        r = httpx.get(_url(server, name), headers=header, timeout=60)
        assert r.status_code == 500, r.status_code  # refused before a byte of it was sent
    except httpx.RemoteProtocolError:
        pass  # or cut once the response had started
    assert _corrupt(server, v.ref)
    # bytes of the file outside the damaged chunk are still served exactly
    assert offset >= 1000
    r = httpx.get(_url(server, name), headers={"Range": f"bytes={offset - 1000}-{offset - 1}"})
    assert r.status_code == 206 and r.content == data[offset - 1000:offset]


def test_a_damaged_raw_object_is_never_packed(server: Server, server_ctx: RegistryContext, name: str,
                                              tmp_path: Path) -> None:
    v, data = _push(server, name, tmp_path / "m", _tensors(3))
    sha = hashlib.sha256(data).hexdigest()
    raw = server_ctx.store.local_path(sha)
    assert raw is not None
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x01
    raw.write_bytes(bytes(damaged))
    objects = server.blob_files()
    with pytest.raises(content.ContentError, match="hash to"):
        packing.pack_version(server_ctx, v.id)
    with server_ctx.db.read() as s:
        assert s.scalar(select(Blob.form).where(Blob.sha256 == sha)) == "raw"
    assert server.blob_files() == objects  # nothing was written to the store
    raw.write_bytes(data)  # restored: now it packs
    assert packing.pack_version(server_ctx, v.id).files_packed == 1
    assert httpx.get(_url(server, name)).content == data


def test_a_damaged_chunk_is_not_reused(server: Server, server_ctx: RegistryContext, name: str, tmp_path: Path) -> None:
    tensors = _tensors(4)
    first, _ = _push(server, f"{name}-a", tmp_path / "a", tensors)
    packing.pack_version(server_ctx, first.id)
    first_sha = first.files[0].sha256
    path, _, _ = _payload_path(server_ctx, first_sha, "BF16")
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    # the same tensors in another file (other header metadata): its chunks would be reused
    again, data = _push(server, f"{name}-b", tmp_path / "b", tensors, metadata={"note": "re-upload"})
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(content.ContentError):
        packing.pack_version(server_ctx, again.id)
    assert not content.is_packed(server_ctx, sha) and server_ctx.store.exists(sha)  # kept raw
    assert httpx.get(_url(server, f"{name}-b")).content == data


def test_windows_of_segments(server: Server, server_ctx: RegistryContext, name: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A file read in many windows (a few segments each), with the same tensor bytes repeated
    within a window and across windows: each distinct segment is one chunk, the file exact."""
    monkeypatch.setattr(packing, "WINDOW_SEGMENTS", 7)
    g = torch.Generator().manual_seed(5)
    same = torch.randn(64, 64, generator=g)
    tensors = {f"t{i:02d}": (same.clone() if i % 5 == 0 else torch.randn(64, 64, generator=g)) for i in range(40)}
    v, data = _push(server, name, tmp_path / "m", tensors)
    sha = hashlib.sha256(data).hexdigest()
    report = packing.pack_version(server_ctx, v.id)
    assert report.files_packed == 1
    assert report.chunks_new == 1 + 32 + 1  # the header, 32 distinct tensors, the repeated one once
    assert content.is_packed(server_ctx, sha) and not server_ctx.store.exists(sha)
    assert httpx.get(_url(server, name)).content == data
