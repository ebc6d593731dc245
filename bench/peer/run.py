"""Speed against MLflow: our registry and an MLflow 3.17 tracking/registry server, side by side.

For each database (SQLite file, PostgreSQL) both servers run on this machine with the same number
of worker processes; a bounded load generator (``loadgen.py``: fixed operation count, fixed
concurrency, warm-up excluded, every latency kept, exact percentiles) measures, in the same run:

    get_number     one version by model + number
    get_alias      one version by model + alias
    search_1       versions with a tag value ~1 % of the 10k versions carry, up to 100 returned
    search_10      the same for a tag value ~10 % carry (100 of ~1000 matches returned)
    create         a new version: MLflow 1 request (metadata pointing at an artifact URI);
                   ours 3 requests: draft + link bytes the registry already holds (sha256) + commit
    create_upload  ours only: draft + upload a 128-byte safetensors file + commit
    create_manifest  ours only: the same version as create in 1 request (POST /models/{name}/versions
                   with a manifest of held sha256s); compared with MLflow's create

Data: ``--versions`` versions over ``--models`` models, written in bulk straight into each system's
tables after its own migrations (``bulk.py``, the default: seconds for 10k, ~17 s for 100k) or, with
``--populate api``, created through each system's own HTTP API (``systems.py``: tags, aliases; slow,
each version is a real create). The populated database of each system (SQLite file / PostgreSQL
template database, plus our blob directory) is kept as a snapshot under ``--data`` and every run
measures a fresh copy of it; ``--fresh`` populates again. Measurement rounds alternate which system
goes first; each table row is the best round by throughput, every round is in the JSON file.

    python bench/peer/run.py                        # SQLite and PostgreSQL
    python bench/peer/run.py --db sqlite --versions 2000 --repeat 1 --requests 500   # quick look
    python bench/peer/run.py --ours-tree before=/tmp/registry-before   # also an older checkout of ours
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peer import bulk, loadgen  # noqa: E402
from bench.peer.systems import MLflow, Ours, System, busiest_share  # noqa: E402
from tests.conftest import PG_ADMIN_URL, free_port  # noqa: E402

READS = ("get_number", "get_alias", "search_1", "search_10")
WRITES = ("create", "create_upload", "create_manifest")
VS_MLFLOW_CREATE = ("create_upload", "create_manifest")  # ours only: compared with MLflow's create
DATASET = 2  # bump when systems.py changes what a populated database holds


def machine() -> dict[str, Any]:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gib": round(int(mem.split()[1]) / 2**20, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def versions_of() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("mlflow", "fastapi", "uvicorn", "sqlalchemy", "psycopg")}


class Pg:
    """CREATE / DROP of this benchmark's PostgreSQL databases (run copies are dropped at the end)."""

    def __init__(self) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.run_dbs: list[str] = []

    def url(self, name: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def exists(self, name: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %(n)s", {"n": name}).first()
        return row is not None

    def create(self, name: str, template: str | None = None) -> str:
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def vacuum_analyze(self, name: str) -> None:
        from sqlalchemy import create_engine

        engine = create_engine(self.url(name), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
        engine.dispose()

    def drop(self, name: str) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def new_run_db(self, label: str, template: str) -> str:
        name = f"peer_run_{label}_{uuid.uuid4().hex[:8]}"
        self.run_dbs.append(name)
        return self.create(name, template)

    def close(self) -> None:
        for name in self.run_dbs:
            self.drop(name)
        self.engine.dispose()


def _copy_home(src: Path, dst: Path) -> None:
    """A server home: database files copied, blobs (immutable, content-addressed) hard-linked."""
    def copy(s: str, d: str) -> None:
        if "/blobs/" in s:
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy, ignore=shutil.ignore_patterns("*.log", "staging", "artifacts"))


async def populate(s: System, args: argparse.Namespace) -> dict[str, Any]:
    conn = loadgen.Conn(s.url)
    models = [f"m{k:03d}" for k in range(args.models)]
    await s.create_models(conn, models)
    t0, cpu0 = time.perf_counter(), s.cpu_seconds()
    res = await loadgen.run(s.url, s.populate_op(args.models), total=args.versions,
                            concurrency=args.populate_concurrency, name=f"{s.label} populate")
    cpu = s.cpu_seconds() - cpu0
    if res.errors:
        raise RuntimeError(f"{s.label}: populate failed {res.errors} times: {res.first_error}")
    per_model = args.versions // args.models
    for m in models:
        await s.set_alias(conn, m, "production", per_model // 2)
    await conn.close()
    out = {**res.summary(), "wall_s": round(time.perf_counter() - t0, 1), "server_cpu_s": round(cpu, 1),
           "date": dt.datetime.now().isoformat(timespec="seconds"), "loadavg": loadavg(),
           "concurrency": args.populate_concurrency}
    del out["first_error"]
    print(f"  {s.label}: populated {args.versions} versions in {out['seconds']} s ({out['ops_per_s']} versions/s, "
          f"{out['req_per_s']} req/s)", flush=True)
    return out


async def prepare(kind: str, db: str, args: argparse.Namespace, pg: Pg | None, root: Path) -> dict[str, Any]:
    """Make sure a populated snapshot of ``kind`` (ours | mlflow) on ``db`` exists; returns its metadata."""
    mode = "" if args.populate == "api" else "b"
    key = f"{kind}-{db}-v{args.versions}-m{args.models}-d{DATASET}{mode}"
    snap = (args.data / "snapshots" / key).resolve()
    pg_name = f"peer_snap_{kind}_v{args.versions}_m{args.models}_d{DATASET}{mode}"
    meta_file = snap / "meta.json"
    if meta_file.exists() and not args.fresh and (db == "sqlite" or (pg is not None and pg.exists(pg_name))):
        return json.loads(meta_file.read_text()) | {"pg_template": pg_name, "snapshot": str(snap)}
    shutil.rmtree(snap, ignore_errors=True)
    home = root / f"populate-{kind}"
    s: System = Ours(kind, free_port(), home) if kind == "ours" else MLflow(kind, free_port(), home)
    home.mkdir(parents=True, exist_ok=True)
    if db == "sqlite":
        url = f"sqlite:///{home / 'db.sqlite'}"
    else:
        assert pg is not None
        pg.drop(pg_name)
        url = pg.create(pg_name)
    print(f"{db}: populating {kind} ({args.populate}, snapshot {snap})", flush=True)
    if args.populate == "bulk":
        t0, cpu0 = time.perf_counter(), time.process_time()
        if kind == "ours":
            s.shas = bulk.populate_ours(url, home, versions=args.versions, models=args.models)
        else:
            bulk.populate_mlflow(url, versions=args.versions, models=args.models)
        stats = {"mode": "bulk", "wall_s": round(time.perf_counter() - t0, 1),
                 "cpu_s": round(time.process_time() - cpu0, 1),
                 "date": dt.datetime.now().isoformat(timespec="seconds"), "loadavg": loadavg()}
        return _snapshot(home, snap, meta_file, {"populate": stats, "shas": s.shas}, pg_name)
    s.start(url, args.workers)
    try:
        stats = await populate(s, args)
    finally:
        s.stop()
    stats["mode"] = "api"
    if db == "postgres":
        # What autovacuum does to a table this size within a minute or so; a database copied from a
        # template keeps these statistics but never gets its own (its change counters start at 0),
        # and without them PostgreSQL picks nested loops that cost MLflow's tag search seconds.
        assert pg is not None
        pg.vacuum_analyze(pg_name)
    return _snapshot(home, snap, meta_file, {"populate": stats, "shas": s.shas}, pg_name)


def _snapshot(home: Path, snap: Path, meta_file: Path, meta: dict[str, Any], pg_name: str) -> dict[str, Any]:
    snap.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(home, snap, ignore=shutil.ignore_patterns("*.log", "staging", "artifacts", "tmp*"))
    meta_file.write_text(json.dumps(meta))
    shutil.rmtree(home, ignore_errors=True)
    return meta | {"pg_template": pg_name, "snapshot": str(snap)}


def start_copy(s: System, db: str, meta: dict[str, Any], args: argparse.Namespace, pg: Pg | None) -> float:
    """Start ``s`` on a fresh copy of its populated snapshot; returns the start-up seconds."""
    _copy_home(Path(meta["snapshot"]), s.home)
    (s.home / "meta.json").unlink(missing_ok=True)
    s.shas.extend(tuple(x) for x in meta.get("shas", []))
    if db == "sqlite":
        url = f"sqlite:///{s.home / 'db.sqlite'}"
    else:
        assert pg is not None
        url = pg.new_run_db(s.label.replace("@", "_").replace("-", "_"), meta["pg_template"])
    t0 = time.perf_counter()
    s.start(url, args.workers)
    return time.perf_counter() - t0


async def check_data(s: System, args: argparse.Namespace) -> dict[str, int]:
    conn = loadgen.Conn(s.url)
    try:
        return {"bucket=7": await s.count_hits(conn, "bucket", "7"),
                "decile=3": await s.count_hits(conn, "decile", "3")}
    finally:
        await conn.close()


async def measure_round(systems: list[System], rnd: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    per_model = args.versions // args.models
    order = systems if rnd % 2 == 0 else systems[::-1]
    ops = {s.label: s.operations(models=args.models, per_model=per_model, round_tag=f"r{rnd}",
                                 create_models=args.create_models) for s in systems}
    for s in systems if set(WRITES) & set(args.ops) else ():
        conn = loadgen.Conn(s.url)
        await s.create_models(conn, s.create_model_names(f"r{rnd}", args.create_models))
        await conn.close()
    for name in (n for n in (*READS, *WRITES) if n in args.ops):
        for s in order:
            op = ops[s.label].get(name)
            if op is None:
                continue
            write = name in WRITES
            total, warmup = (args.creates, args.create_warmup) if write else (args.requests, args.warmup)
            by_pid0, client0 = s.cpu_by_pid(), time.process_time()
            cpu0 = sum(by_pid0.values())
            res = await loadgen.measure(s.url, op, total=total, warmup=warmup, concurrency=args.concurrency,
                                        start=rnd * (total + warmup), name=f"{s.label} {name}")
            by_pid = s.cpu_by_pid()
            cpu = sum(by_pid.values()) - cpu0  # the warm-up's share included, hence divided by all operations
            client = time.process_time() - client0
            row = {"round": rnd, "system": s.label, "op": name, **res.summary(),
                   "server_cpu_ms_per_op": round(cpu * 1000 / (total + warmup), 2),
                   "client_cpu_ms_per_op": round(client * 1000 / (total + warmup), 2),
                   "busiest_process_share": round(busiest_share(by_pid0, by_pid), 2), "loadavg": loadavg()}
            rows.append(row)
            print(f"  r{rnd} {s.label:12} {name:13} {row['ops_per_s']:8.1f} ops/s {row['req_per_s']:8.1f} req/s "
                  f"p50 {row['p50_ms']:7.2f} p99 {row['p99_ms']:8.2f} ms  cpu {row['server_cpu_ms_per_op']:6.2f} "
                  f"ms/op  busiest {row['busiest_process_share']:.0%}  err {row['errors']}  "
                  f"load {row['loadavg'].split()[0]}"
                  + (f" ({row['first_error']})" if row["errors"] else ""), flush=True)
    return rows


async def run_db(db: str, args: argparse.Namespace, pg: Pg | None) -> dict[str, Any]:
    root = (args.data / f"run-{db}-{uuid.uuid4().hex[:6]}").resolve()
    meta = {kind: await prepare(kind, db, args, pg, root) for kind in ("ours", "mlflow")}
    if args.prepare_only:
        shutil.rmtree(root, ignore_errors=True)
        return {"db": db, "populate": {k: m["populate"] for k, m in meta.items()}, "rows": [], "hits": {}}
    systems: list[System] = [Ours("ours", free_port(), root / "ours")]
    for label, tree in args.ours_tree:
        systems.append(Ours(f"ours@{label}", free_port(), root / f"ours-{label}", tree=tree))
    systems.append(MLflow("mlflow", free_port(), root / "mlflow"))
    out: dict[str, Any] = {"db": db, "populate": {k: m["populate"] for k, m in meta.items()}, "rows": [],
                           "hits": {}, "startup_s": {}}
    try:
        for s in systems:
            out["startup_s"][s.label] = round(start_copy(s, db, meta["mlflow" if s.label == "mlflow" else "ours"],
                                                         args, pg), 1)
            out["hits"][s.label] = await check_data(s, args)
            print(f"{db}: {s.label} up on {s.url} in {out['startup_s'][s.label]} s; matches {out['hits'][s.label]}",
                  flush=True)
        for rnd in range(args.repeat):
            out["rows"] += await measure_round(systems, rnd, args)
    finally:
        for s in systems:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ tables


def best(rows: list[dict[str, Any]], system: str, op: str) -> dict[str, Any] | None:
    mine = [r for r in rows if r["system"] == system and r["op"] == op]
    return max(mine, key=lambda r: r["ops_per_s"]) if mine else None


def table(db: str, rows: list[dict[str, Any]]) -> str:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lines = [f"| {db}: operation | system | ops/s | req/s | p50 ms | p99 ms | server CPU ms/op | busiest process | "
             "errors | ours ÷ MLflow (ops/s) | p99 vs MLflow | goal: ≥ 3× and lower p99 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for op in (*READS, *WRITES):
        ml = best(rows, "mlflow", op) or (best(rows, "mlflow", "create") if op in VS_MLFLOW_CREATE else None)
        for system in systems:
            r = best(rows, system, op) if system != "mlflow" or op not in VS_MLFLOW_CREATE else None
            if r is None:
                continue
            ratio = p99 = verdict = ""
            if system != "mlflow" and ml is not None:
                x = r["ops_per_s"] / ml["ops_per_s"] if ml["ops_per_s"] else float("inf")
                lower = r["p99_ms"] < ml["p99_ms"]
                ratio = f"{x:.2f}×"
                p99 = "lower" if lower else "**higher**"
                if x >= 3 and lower:
                    verdict = "met"
                elif x < 1:
                    verdict = "**we lose** (slower)"
                elif not lower:
                    verdict = "**missed** (p99 higher)"
                else:
                    verdict = "**missed** (< 3×)"
                if op in VS_MLFLOW_CREATE:
                    ratio += " (vs MLflow create)"
            name = "MLflow" if system == "mlflow" else system
            lines.append(f"| {op} | {name} | {r['ops_per_s']:.0f} | {r['req_per_s']:.0f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['server_cpu_ms_per_op']:.1f} | "
                         f"{r.get('busiest_process_share', 0):.0%} | "
                         f"{r['errors']} | {ratio} | {p99} | "
                         f"{verdict} |")
    return "\n".join(lines)


def report(info: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    m = info["machine"]
    out = [f"Machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}, "
           f"kernel {m['kernel']}; {info['date']}; load average at start {info['loadavg_start']}, at end "
           f"{info['loadavg_end']}; {info['wall_s']} s in all. Versions: "
           + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
           f"Each row: best of {args.repeat} rounds by ops/s (p50/p99 from that round); {args.requests} timed "
           f"reads / {args.creates} timed creates per measurement after {args.warmup} / {args.create_warmup} "
           f"warm-up, concurrency {args.concurrency}, {args.workers} server processes per system; *busiest "
           "process* = the largest share one process of a server took of that server's CPU in the measurement "
           f"(1/{args.workers} = evenly spread).", ""]
    for r in results:
        def pop(v: dict[str, Any]) -> str:
            if v.get("mode") == "bulk":
                return f"bulk-written in {v['wall_s']} s ({v['date']})"
            return f"through the API at {v['ops_per_s']:.0f} versions/s ({v['req_per_s']:.0f} req/s, {v['date']})"

        pops = "; ".join(f"{k} {pop(v)}" for k, v in r["populate"].items())
        out += [f"{r['db']}: {args.versions} versions; populated: {pops}. "
                f"Matches: " + "; ".join(f"{k} {v}" for k, v in r["hits"].items()) + ".", "",
                table(r["db"], r["rows"]), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    ap.add_argument("--workers", type=int, default=2, help="server processes for each system")
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--populate-concurrency", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000, help="timed operations per read measurement")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--creates", type=int, default=400, help="timed operations per create measurement")
    ap.add_argument("--create-warmup", type=int, default=40)
    ap.add_argument("--create-models", type=int, default=20, help="models the creates of one round spread over")
    ap.add_argument("--repeat", type=int, default=2, help="measurement rounds per database")
    ap.add_argument("--data", type=Path, default=Path(".bench-data/peer"))
    ap.add_argument("--populate", choices=("bulk", "api"), default="bulk",
                    help="bulk: rows written straight into each system's tables (bulk.py); api: every version "
                         "created through the HTTP API (21 min for 10k)")
    ap.add_argument("--ops", default=",".join((*READS, *WRITES)), help="comma-separated operations to measure")
    ap.add_argument("--fresh", action="store_true", help="populate again instead of using the snapshots")
    ap.add_argument("--prepare-only", action="store_true", help="only make the populated snapshots")
    ap.add_argument("--ours-tree", action="append", default=[], metavar="LABEL=PATH",
                    help="also measure our server run from another source tree (e.g. before a change)")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the report (tables) here")
    args = ap.parse_args()
    args.ours_tree = [(lab, Path(p).resolve()) for lab, _, p in (t.partition("=") for t in args.ours_tree)]
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if set(args.ops) - set(READS) - set(WRITES):
        ap.error(f"unknown operations: {sorted(set(args.ops) - set(READS) - set(WRITES))}")
    limit = min(args.versions, bulk.DEFAULT_BLOBS) if args.populate == "bulk" else args.versions
    if set(WRITES) & set(args.ops) and args.repeat * (args.creates + args.create_warmup) > limit:
        ap.error("--repeat x (--creates + --create-warmup) must not exceed --versions (each create links a new blob)")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    # A SIGTERM (timeout, Ctrl-C elsewhere) unwinds like an exception, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = {"machine": machine(), "date": dt.date.today().isoformat(), "argv": sys.argv, "loadavg_start": loadavg(),
            "versions": versions_of(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {info['machine']}  loadavg {info['loadavg_start']}", flush=True)
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    pg = Pg() if "postgres" in dbs else None
    results = []
    t0 = time.perf_counter()
    try:
        for db in dbs:
            results.append(asyncio.run(run_db(db, args, pg)))
    finally:
        if pg is not None:
            pg.close()
    info["wall_s"] = round(time.perf_counter() - t0)
    info["loadavg_end"] = loadavg()
    text = report(info, results, args)
    print("\n" + text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
