"""Concurrent pushes to one model get distinct, consecutive version numbers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from registry.demo import make_base

from .conftest import Server


def test_20_concurrent_pushes(server: Server, tmp_path: Path, name: str) -> None:
    folders = [make_base(tmp_path / f"b{i}", seed=1000 + i) for i in range(20)]

    def push(folder: Path) -> int:
        with server.client() as rc:
            return int(rc.push(folder, name).version)

    with ThreadPoolExecutor(max_workers=20) as pool:
        versions = list(pool.map(push, folders))
    assert sorted(versions) == list(range(1, 21))
    with server.client() as rc:
        listed = [v.version for v in rc.iter_versions(model=name, limit=7)]
        assert listed == list(range(20, 0, -1))
        assert rc.get_model(name).latest_version == 20
