"""Bulk populate: the data set of ``systems.py`` written straight into each system's tables.

Creating 10 000 versions through the HTTP APIs takes about 21 minutes here; 1 000 000 would take
days. This writes the same rows the APIs would (``systems.tags_for`` tags, the ``production``
alias of every model on its version ``per_model // 2``) with batched INSERTs (SQLite) or COPY
(PostgreSQL), after each system has created its own schema (our Alembic migrations,
``mlflow db upgrade``):

- ours: ``models``, ``model_versions`` (status ready, stored, one ``model.safetensors`` file),
  ``blobs``, ``version_files``, ``version_tags``, ``aliases``. ``blobs`` distinct tiny safetensors
  files (``systems.weights_bytes``) are really put into the blob store; version ``i`` holds blob
  ``i % blobs``. With a prime ``blobs`` (default 9973, not a multiple of the 100 models) two versions
  of one model share bytes only past ``models × blobs`` versions (~1 M) — which the API would refuse as a
  duplicate — and the ``create`` measurement can link any of the first ``blobs`` (each once). The
  summary, fingerprint and tensor index come from inspecting one of those files with the same
  code a commit runs. No ``events`` rows are written (nothing the reads touch).
- MLflow: ``registered_models``, ``model_versions`` (status READY, stage None, an ``s3://`` source
  as ``systems.MLflow.populate_op`` sends), ``model_version_tags``, ``registered_model_aliases``.

Both end with ANALYZE (PostgreSQL: VACUUM ANALYZE) so the planner has statistics, as autovacuum
would give a database grown through its API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from .systems import ROOT, tags_for, weights_bytes

DEFAULT_BLOBS = 9973
ALIAS = "production"
CHUNK = 20_000


def alias_version(per_model: int) -> int:
    return per_model // 2


def _pg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _copy_pg(url: str, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """COPY ``rows`` into ``table`` (psycopg 3, text format via write_row)."""
    import psycopg

    n = 0
    with psycopg.connect(_pg_dsn(url)) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
                n += 1
        conn.commit()
    return n


def _insert_sqlite(path: str, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    n = 0
    batch: list[Sequence[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= CHUNK:
            con.executemany(sql, batch)
            n += len(batch)
            batch.clear()
    if batch:
        con.executemany(sql, batch)
        n += len(batch)
    con.commit()
    con.close()
    return n


class Writer:
    """Rows into one database, PostgreSQL (COPY) or SQLite (executemany)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_pg = make_url(url).get_backend_name() == "postgresql"

    def rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        if self.is_pg:
            return _copy_pg(self.url, table, columns, rows)
        return _insert_sqlite(make_url(self.url).database or "", table, columns, rows)

    def value(self, v: Any) -> Any:
        """A Python value as the driver should receive it (datetimes: aware UTC; SQLite: ISO text
        as SQLAlchemy's DateTime stores it)."""
        if isinstance(v, dt.datetime) and not self.is_pg:
            return v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return v

    def analyze(self) -> None:
        if self.is_pg:
            engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
            engine.dispose()
        else:
            import sqlite3

            con = sqlite3.connect(make_url(self.url).database or "")
            con.execute("ANALYZE")
            con.close()


def _spread(n: int, models: int) -> Iterator[tuple[int, int, int]]:
    """(i, model index, version number) for the n versions, round-robin over the models, as the
    API populate creates them (version i is the (i // models + 1)-th of model i % models)."""
    for i in range(n):
        yield i, i % models, i // models + 1


# ------------------------------------------------------------------------------------------ ours


def populate_ours(db_url: str, home: Path, *, versions: int, models: int,
                  blobs: int = DEFAULT_BLOBS) -> list[tuple[str, int]]:
    """Our schema (migrations) and the data set; returns (sha256, size) of the blobs, in order."""
    from registry.config import Settings
    from registry.formats import inspect as fmt
    from registry.services.context import RegistryContext
    from registry.services.drafts import local_source

    settings = Settings(home=home, database_url=db_url)
    ctx = RegistryContext.open(settings, migrate=True)
    try:
        nblobs = min(blobs, versions)
        shas: list[tuple[str, int]] = []
        with tempfile.TemporaryDirectory(dir=home) as tmp:
            f = Path(tmp) / "w.safetensors"
            insp = None
            for k in range(nblobs):
                data = weights_bytes(k)
                sha = hashlib.sha256(data).hexdigest()
                f.write_bytes(data)
                if insp is None:
                    insp = fmt.inspect_version("base", {"model.safetensors": local_source(
                        "model.safetensors", f, sha, len(data))}, max_header_bytes=settings.max_header_bytes,
                        check_finite=False)
                ctx.store.put(sha, f)
                shas.append((sha, len(data)))
        assert insp is not None
    finally:
        ctx.close()
    w = Writer(db_url)
    now = dt.datetime.now(dt.UTC)
    per_model = versions // models
    last = [0] * models
    for _, m, number in _spread(versions, models):
        last[m] = number
    w.rows("models", ("id", "name", "kind", "description", "last_version", "created_at", "created_by"),
           ((m + 1, f"m{m:03d}", "base", "", last[m], w.value(now), "anonymous") for m in range(models)))
    w.rows("blobs", ("sha256", "size", "created_at", "state", "touched_at", "form", "stored_size"),
           ((sha, size, w.value(now), "ready", w.value(now), "raw", size) for sha, size in shas))
    summary, tindex = json.dumps(insp.summary), json.dumps(insp.tensor_index)
    chash = [fmt.content_hash({"model.safetensors": sha}) for sha, _ in shas]

    def version_rows() -> Iterator[tuple[Any, ...]]:
        for i, m, number in _spread(versions, models):
            k = i % nblobs
            yield (i + 1, m + 1, number, "base", "ready", "stored", None, insp.fingerprint, chash[k], shas[k][1], 1,
                   "", summary, tindex, None, None, w.value(now), "anonymous", None, None, None,
                   shas[k][1] if i < nblobs else 0)

    t0 = time.perf_counter()
    w.rows("model_versions", ("id", "model_id", "version", "kind", "status", "storage_mode", "base_version_id",
                              "fingerprint", "content_sha256", "total_size", "file_count", "description", "summary",
                              "tensor_index", "recipe", "mlflow_run_id", "created_at", "created_by", "archived_at",
                              "verified_at", "corrupt_at", "stored_bytes"), version_rows())
    w.rows("version_files", ("version_id", "path", "blob_sha256", "size"),
           ((i + 1, "model.safetensors", shas[i % nblobs][0], shas[i % nblobs][1]) for i in range(versions)))
    w.rows("version_tags", ("version_id", "key", "value"),
           ((i + 1, k, v) for i in range(versions) for k, v in tags_for(i).items()))
    # version number n of model m has id (n - 1) * models + m + 1
    w.rows("aliases", ("model_id", "name", "version_id", "updated_at"),
           ((m + 1, ALIAS, (alias_version(per_model) - 1) * models + m + 1, w.value(now)) for m in range(models)))
    if w.is_pg:  # rows given explicit ids: the sequences move past them, as after API inserts
        engine = create_engine(db_url)
        with engine.begin() as conn:
            for table in ("models", "model_versions"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT max(id) FROM {table}))"))
        engine.dispose()
    w.analyze()
    print(f"  ours: {versions} versions written in {time.perf_counter() - t0:.1f} s", flush=True)
    return shas


# ---------------------------------------------------------------------------------------- MLflow


def populate_mlflow(db_url: str, *, versions: int, models: int) -> None:
    """``mlflow db upgrade`` then the data set in MLflow's registry tables."""
    subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", db_url], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    w = Writer(db_url)
    engine = create_engine(db_url)
    cols = {t: {c["name"]: c for c in inspect(engine).get_columns(t)}
            for t in ("registered_models", "model_versions", "model_version_tags", "registered_model_aliases")}
    engine.dispose()
    ms = int(time.time() * 1000)
    per_model = versions // models

    def fill(table: str, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` plus NULL for the table's other nullable columns (refuse a NOT NULL one we do not know)."""
        out = dict(given)
        for name, c in cols[table].items():
            if name in out:
                continue
            if not c["nullable"] and c.get("default") is None:
                raise RuntimeError(f"MLflow's {table}.{name} is NOT NULL and this populate does not know it")
            if c.get("default") is None:
                out[name] = None
        return out

    def table(name: str, rows: Iterable[dict[str, Any]]) -> None:
        it = iter(rows)
        first = next(it, None)
        if first is None:
            return
        columns = list(first)

        def all_rows() -> Iterator[tuple[Any, ...]]:
            yield tuple(first[c] for c in columns)
            for r in it:
                yield tuple(r[c] for c in columns)

        w.rows(name, columns, all_rows())

    t0 = time.perf_counter()
    table("registered_models", (fill("registered_models", {
        "name": f"m{m:03d}", "creation_time": ms, "last_updated_time": ms, "description": None})
        for m in range(models)))
    table("model_versions", (fill("model_versions", {
        "name": f"m{m:03d}", "version": number, "creation_time": ms, "last_updated_time": ms, "description": None,
        "user_id": None, "current_stage": "None", "source": f"s3://bench-bucket/m{m:03d}/{i}", "run_id": None,
        "status": "READY", "status_message": None, "run_link": None,
        **({"storage_location": f"s3://bench-bucket/m{m:03d}/{i}"} if "storage_location" in cols["model_versions"]
           else {})}) for i, m, number in _spread(versions, models)))
    table("model_version_tags", (fill("model_version_tags", {"key": k, "value": v, "name": f"m{m:03d}",
                                                              "version": number})
                                 for i, m, number in _spread(versions, models) for k, v in tags_for(i).items()))
    table("registered_model_aliases", (fill("registered_model_aliases", {
        "alias": ALIAS, "version": alias_version(per_model), "name": f"m{m:03d}"}) for m in range(models)))
    w.analyze()
    print(f"  mlflow: {versions} versions written in {time.perf_counter() - t0:.1f} s", flush=True)
