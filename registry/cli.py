"""The ``registry`` command.

Client commands (push, pull, ls, show, lineage, alias, tag, archive) talk to a server over HTTP:
``--server``/``REGISTRY_URL`` and ``--token``/``REGISTRY_TOKEN``. Server-side commands (up, gc,
token, db) act on the registry configured by ``REGISTRY_*`` settings (by default the embedded
one under ``REGISTRY_HOME``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.tree import Tree

from . import __version__
from .client import (
    BadRequest,
    ChecksumMismatch,
    Compression,
    Conflict,
    DataCorrupt,
    Forbidden,
    Gone,
    InvalidInput,
    Job,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RegistryClient,
    RegistryClientError,
    ServerUnreachable,
    Unauthorized,
    iter_folder,
)
from .config import get_settings, is_loopback
from .units import human_bytes

app = typer.Typer(help="Model registry for base models, LoRA adapters, fine-tunes and merges.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
alias_app = typer.Typer(help="Movable names for versions (production, staging, ...).", no_args_is_help=True)
tag_app = typer.Typer(help="Key/value tags on versions.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (acts on the configured registry database).", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
basis_app = typer.Typer(help="RMM bases: many adapters of one base in one reconstructable basis.", no_args_is_help=True)
policy_app = typer.Typer(help="Automation policies (transfer on base update, refresh basis, compress collection).",
                         no_args_is_help=True)
app.add_typer(alias_app, name="alias")
app.add_typer(tag_app, name="tag")
app.add_typer(token_app, name="token")
app.add_typer(db_app, name="db")
app.add_typer(basis_app, name="basis")
app.add_typer(policy_app, name="policy")
webhook_app = typer.Typer(help="Webhooks: signed HTTP callbacks for registry events.", no_args_is_help=True)
app.add_typer(webhook_app, name="webhook")


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's layout; a pipe or file gets every column whole, never wrapped or cut."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=1 << 16, soft_wrap=True)


out = _console()
err = _console(stderr=True)
_state: dict[str, Any] = {}
# click's base of command-line errors (typer vendors click in newer releases: take the one it raises)
ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# ---------------------------------------------------------------------------- exit codes
# The one table of the CLI's exit statuses (README "CLI"): 0 success, 1 any other error, 2 a bad
# command line (click's usage errors), then one per kind of failure, from the client's exceptions.

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_NOT_FOUND, EXIT_INVALID, EXIT_CONFLICT, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_JOB_FAILED, EXIT_INTEGRITY = range(3, 10)
EXIT_CODES: dict[type[BaseException], int] = {
    ClickException: EXIT_USAGE,
    NotFound: EXIT_NOT_FOUND, Gone: EXIT_NOT_FOUND, FileNotFoundError: EXIT_NOT_FOUND,
    InvalidInput: EXIT_INVALID, BadRequest: EXIT_INVALID, PayloadTooLarge: EXIT_INVALID,
    RangeNotSatisfiable: EXIT_INVALID, ValueError: EXIT_INVALID, OSError: EXIT_INVALID,  # local files too
    TimeoutError: EXIT_ERROR,  # wait_job ran out of time (an OSError, but not a bad input)
    Conflict: EXIT_CONFLICT,
    Unauthorized: EXIT_AUTH, Forbidden: EXIT_AUTH,
    ServerUnreachable: EXIT_UNREACHABLE,
    JobFailed: EXIT_JOB_FAILED,
    ChecksumMismatch: EXIT_INTEGRITY, DataCorrupt: EXIT_INTEGRITY,
}


def exit_code(error: BaseException) -> int:
    """The exit status for ``error``: its nearest class in EXIT_CODES, else 1."""
    return next((EXIT_CODES[c] for c in type(error).__mro__ if c in EXIT_CODES), EXIT_ERROR)


def _error_doc(error: BaseException, code: int) -> dict[str, Any]:
    if isinstance(error, RegistryClientError):
        body = error.to_dict()["error"]
    elif isinstance(error, ClickException):
        body = {"code": "usage", "message": error.format_message(), "details": {}, "status": 0}  # type: ignore[attr-defined]
    else:
        names: dict[type[BaseException], str] = {FileNotFoundError: "file_not_found", TimeoutError: "timeout"}
        name = names.get(type(error), "invalid_input" if code == EXIT_INVALID else "error")
        body = {"code": name, "message": str(error), "details": {}, "status": 0}
    return {"error": {**body, "exit_code": code}}


def _fail(error: BaseException, as_json: bool) -> typer.Exit:
    """Report ``error`` on stderr (one JSON line with --json) and return the Exit to raise."""
    code = exit_code(error)
    if as_json:
        sys.stdout.flush()
        print(json.dumps(_error_doc(error, code), default=str), file=sys.stderr, flush=True)
    elif isinstance(error, JobFailed):  # no HTTP status to show: the job's own error
        err.print("[red]error[/red]: " + escape(f"{error.message} ({error.code})"), highlight=False)
        if error.details:
            err.print_json(data=error.details)
    elif isinstance(error, RegistryClientError) and error.status:
        err.print(f"[red]error[/red] ({error.status} {error.code}): " + escape(error.message), highlight=False)
        if error.details:
            err.print_json(data=error.details)
    else:
        err.print("[red]error[/red]: " + escape(str(error)), highlight=False)
    return typer.Exit(code)


@contextmanager
def _errors(as_json: bool = False) -> Iterator[None]:
    """Turn what a command raises into its message and exit status (JSON on stderr with --json)."""
    _state["json"] = as_json
    try:
        yield
    except (RegistryClientError, OSError, ValueError, TimeoutError) as e:
        raise _fail(e, as_json) from None


def _note(message: str) -> None:
    """An informational line on stderr (a JSON object with --json)."""
    if _state.get("json"):
        print(json.dumps({"message": message}), file=sys.stderr, flush=True)
    else:
        err.print(message, markup=False, highlight=False)


def run(argv: list[str] | None = None) -> None:
    """The ``registry`` entry point: the app, with usage errors reported as JSON on stderr when the
    command line asks for --json (exit 2 either way)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = app(args, prog_name="registry", standalone_mode=False)
    except ClickException as e:
        if "--json" in args:
            raise SystemExit(_fail(e, True).exit_code) from None
        e.show()  # type: ignore[attr-defined]
        raise SystemExit(e.exit_code) from None  # type: ignore[attr-defined]
    except typer.Abort:
        err.print("aborted")
        raise SystemExit(EXIT_ERROR) from None
    raise SystemExit(rv if isinstance(rv, int) else EXIT_OK)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"registry {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    server: Annotated[str | None, typer.Option("--server", envvar="REGISTRY_URL", help="Registry URL.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="REGISTRY_TOKEN", help="Bearer token.")] = None,
    retry_seconds: Annotated[float | None, typer.Option(
        "--retry-seconds", envvar="REGISTRY_CLIENT_RETRY_SECONDS", min=0,
        help="Keep retrying an unreachable server this long per outage, resuming uploads and downloads "
             "(default 120; 0: fail at once).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["server"] = server
    _state["token"] = token
    _state["retry_seconds"] = retry_seconds


def _client() -> RegistryClient:
    return RegistryClient(_state.get("server"), _state.get("token"), retry_seconds=_state.get("retry_seconds"),
                          on_retry=_note)


class _Lines:
    """Progress as plain lines on stderr, for logs and pipes: one per tenth of each task and one at
    its end (a JSON object per line with --json). The subset of rich's Progress the commands use."""

    def __init__(self) -> None:
        self._tasks: dict[TaskID, dict[str, Any]] = {}

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            for task in self._tasks.values():
                if task["visible"] and task["step"] < 10:
                    self._emit(task, done=True)

    def add_task(self, description: str, total: float | None = None, visible: bool = True) -> TaskID:
        task_id = TaskID(len(self._tasks))
        self._tasks[task_id] = {"description": description, "total": total or 0, "completed": 0.0,
                                "visible": visible, "step": -1, "message": None}
        return task_id

    def advance(self, task_id: TaskID, n: float) -> None:
        self.update(task_id, completed=self._tasks[task_id]["completed"] + n)

    def update(self, task_id: TaskID, completed: float | None = None, description: str | None = None) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task["completed"] = completed
        step = int(10 * task["completed"] / task["total"]) if task["total"] else 10
        changed = description is not None and description != task["message"]
        if description is not None:
            task["message"] = description
        if task["visible"] and (step > task["step"] or changed):
            self._emit(task, done=step >= 10)
        task["step"] = max(task["step"], step)

    @staticmethod
    def _emit(task: dict[str, Any], done: bool) -> None:
        total, completed = task["total"], task["completed"]
        pct = 100.0 if done or not total else min(100.0, 100.0 * completed / total)
        label = task["message"] or task["description"]
        if _state.get("json"):
            print(json.dumps({"progress": {"task": task["description"], "message": task["message"],
                                           "completed": completed, "total": total, "percent": round(pct, 1)}}),
                  file=sys.stderr, flush=True)
        elif total > 1:  # bytes
            print(f"{label}: {human_bytes(int(completed))} of {human_bytes(int(total))} ({pct:.0f}%)",
                  file=sys.stderr, flush=True)
        else:
            print(f"{label}: {pct:.0f}%", file=sys.stderr, flush=True)


def _progress() -> Progress | _Lines:
    """A progress display on stderr: rich's bars on a terminal, plain lines otherwise."""
    if not err.is_terminal:
        return _Lines()
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


def _clip(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters on a terminal; whole when piped."""
    return text[:n] if out.is_terminal else text


def _kv(pairs: list[str] | None, what: str = "tag") -> dict[str, str]:
    out_: dict[str, str] = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"{what} {p!r} must look like key=value")
        out_[k] = v
    return out_


def _jsonable(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list | tuple):
        return [_jsonable(x) for x in data]
    if isinstance(data, dict):
        return {k: _jsonable(v) for k, v in data.items()}
    return data


def _print_json(data: Any) -> None:
    """``data`` (models, lists, dicts) as one JSON document on stdout."""
    sys.stdout.write(json.dumps(_jsonable(data), indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output: JSON on stdout; errors (and "
                                                          "progress) as JSON lines on stderr.")]


# ---------------------------------------------------------------------------- server side


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address (default REGISTRY_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default REGISTRY_PORT, 8080).")] = None,
    workers: Annotated[int | None, typer.Option(help="Workers to start beside the API (default 1).")] = None,
    mlflow_ui: Annotated[bool | None, typer.Option("--mlflow-ui/--no-mlflow-ui", help="Start the MLflow UI.")] = None,
    api_workers: Annotated[int | None, typer.Option(
        help="API processes (default REGISTRY_API_WORKERS, 1); more than 1 runs uvicorn's multi-process mode, "
             "every process configured from the REGISTRY_* environment.")] = None,
) -> None:
    """Run the registry: API, worker(s), dispatcher and MLflow UI, on the embedded default
    (SQLite + local blobs + SQLite broker + MLflow SQLite store under REGISTRY_HOME)."""
    from .api.server import serve
    from .supervisor import Supervisor

    settings = get_settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    if settings.auth == "off" and not is_loopback(settings.host):
        err.print(f"[red]refusing to start[/red]: binding to {settings.host} without authentication would expose "
                  "the registry to the network. Set REGISTRY_AUTH=required and create a token with "
                  "`registry token create NAME --scope admin`, or bind to 127.0.0.1.")
        raise typer.Exit(2)
    settings.home.mkdir(parents=True, exist_ok=True)
    from .db import upgrade

    upgrade(settings.resolved_database_url)
    n_workers = settings.embedded_workers if workers is None else workers
    ui = settings.mlflow_ui if mlflow_ui is None else mlflow_ui
    # the workers publish URLs (MLflow sources, webhooks): they must know where the API really listens
    sup = Supervisor(settings, env=settings.env_for("host", "port"))
    for i in range(n_workers):
        sup.add(f"worker-{i + 1}", [sys.executable, "-m", "registry", "worker", "--hostname", f"embedded-{i + 1}@%h"])
    if n_workers and settings.embedded_dispatcher:
        sup.add("dispatcher", [sys.executable, "-m", "registry", "dispatcher"])
    if ui:
        sup.add("mlflow-ui", [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.resolved_mlflow_uri,
                              "--default-artifact-root", settings.mlflow_artifact_root, "--host", "127.0.0.1",
                              "--port", str(settings.mlflow_ui_port)])
    err.print(f"registry: data in {settings.home.resolve()}, database "
              f"{settings.resolved_database_url.split('@')[-1]}, storage {settings.storage}")
    err.print(f"registry: API on http://{settings.host}:{settings.port}/api/v1 (docs at /docs); "
              f"{n_workers} worker(s) on {settings.resolved_broker_url.split('@')[-1]}"
              + ("; MLflow UI starting (its address is printed here once it answers)" if ui else ""))
    sup.start()
    if ui:
        ui_url = f"http://127.0.0.1:{settings.mlflow_ui_port}"
        ui_log = settings.home.resolve() / "logs" / "mlflow-ui.log"
        sup.when_answering(ui_url, lambda ok: err.print(
            f"registry: MLflow UI on {ui_url}" if ok else
            f"registry: the MLflow UI is not answering on {ui_url} yet; see {ui_log}", highlight=False, soft_wrap=True))
    serve(settings, workers=settings.api_workers if api_workers is None else api_workers, on_exit=sup.stop)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: cpu, gpu.")] = "cpu,gpu",
    concurrency: Annotated[int, typer.Option(help="Jobs at once (threads when > 1).")] = 1,
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a Celery worker that executes registry jobs (bases, transfers, merges, webhooks)."""
    import logging

    from workers.app import celery_app, prepare_broker

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_broker()
    args = ["worker", "-Q", queues, "-c", str(concurrency), "-P", "solo" if concurrency == 1 else "threads",
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if hostname:
        args += ["-n", hostname]
    celery_app.worker_main(args)


@app.command()
def dispatcher() -> None:
    """Run the dispatcher: events -> jobs and webhook deliveries, re-queue jobs of lost workers,
    send queued jobs to the broker."""
    import logging
    import signal
    import threading

    from workers.app import send_job

    from .services.context import RegistryContext
    from .services.dispatcher import run_forever

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = RegistryContext.open(migrate=True)
    ctx.job_sender = send_job
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        run_forever(ctx, stop)
    finally:
        ctx.close()


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be removed.")] = False,
    grace: Annotated[int | None, typer.Option(help="Keep blobs younger than this many seconds.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove blobs no version references, abandoned pushes and orphaned bytes."""
    from .services import gc as gc_service
    from .services.context import RegistryContext

    with _server_errors(as_json):
        ctx = RegistryContext.open(migrate=True)
        try:
            report = gc_service.collect(ctx, dry_run=dry_run, grace_seconds=grace)
        finally:
            ctx.close()
    if as_json:
        _print_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    out.print(f"gc {verb}: {report.blob_rows_removed} blob rows, {report.objects_removed} stored objects, "
              f"{report.drafts_removed} abandoned pushes, {report.staging_dirs_removed} staging dirs; "
              f"{report.bytes_freed} bytes; kept {report.kept_in_use} blobs that came into use")


@contextmanager
def _server_errors(as_json: bool = False) -> Iterator[None]:
    """Server-side commands: the domain's errors (and the client's kinds) as a message and exit status."""
    from .errors import RegistryError

    with _errors(as_json):
        try:
            yield
        except RegistryError as e:  # the same kind, status and code the API would answer with
            from .client_errors import error_for

            raise error_for(e.status, e.code, e.message, e.details) from None


@token_app.command("create")
def token_create(
    name: str,
    scope: Annotated[str, typer.Option(help="read, write or admin.")] = "read",
    expires_days: Annotated[int | None, typer.Option(help="Expire after N days.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token in the configured registry database; prints the secret once."""
    from .services import tokens
    from .services.context import RegistryContext

    with _server_errors(as_json):
        ctx = RegistryContext.open(migrate=True)
        try:
            t = tokens.create(ctx, name, scope, expires_days)
        finally:
            ctx.close()
    if as_json:
        _print_json(t)
        return
    err.print(f"token {t['id']} ({t['scope']}) created; store it now, it is not shown again:")
    out.print(t["token"], markup=False)


@token_app.command("ls")
def token_ls(as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    from .services import tokens
    from .services.context import RegistryContext

    with _server_errors(as_json):
        ctx = RegistryContext.open(migrate=True)
        try:
            rows = tokens.list_tokens(ctx)
        finally:
            ctx.close()
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "name", "scope", "prefix", "created", "expires", "revoked", "last used")
    for t in rows:
        table.add_row(str(t["id"]), t["name"], t["scope"], t["prefix"], str(t["created_at"])[:19],
                      str(t["expires_at"] or "")[:19], "yes" if t["revoked"] else "", str(t["last_used_at"] or "")[:19])
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int, as_json: JsonOpt = False) -> None:
    """Revoke a token by id."""
    from .services import tokens
    from .services.context import RegistryContext

    with _server_errors(as_json):
        ctx = RegistryContext.open(migrate=True)
        try:
            t = tokens.revoke(ctx, token_id)
        finally:
            ctx.close()
    if as_json:
        _print_json(t)
        return
    out.print(f"token {token_id} revoked")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", as_json: JsonOpt = False) -> None:
    """Apply migrations to the configured database."""
    from .db import current_revision, upgrade

    with _server_errors(as_json):
        url = get_settings().resolved_database_url
        upgrade(url, revision)
        now = current_revision(url)
    if as_json:
        _print_json({"revision": now})
        return
    out.print(f"database at revision {now}")


@db_app.command("current")
def db_current(as_json: JsonOpt = False) -> None:
    """Show the database's migration revision."""
    from .db import current_revision

    with _server_errors(as_json):
        now = current_revision(get_settings().resolved_database_url)
    if as_json:
        _print_json({"revision": now})
        return
    out.print(str(now))


@app.command()
def demo(folder: Annotated[Path, typer.Argument(help="Where to write the demo checkpoints.")] = Path("demo"),
         as_json: JsonOpt = False) -> None:
    """Write small demo checkpoints (a base, its v2, two LoRA adapters, a fine-tune)."""
    from .demo import make_demo

    with _errors(as_json):
        paths = make_demo(folder)
    if as_json:
        _print_json({name: str(path) for name, path in paths.items()})
        return
    for name, path in paths.items():
        out.print(f"{name:14s} {path}")


# ---------------------------------------------------------------------------- client side


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="Folder (or file) to upload.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name.")],
    kind: Annotated[str | None, typer.Option(help="base, adapter, finetune or merge (default: inferred).")] = None,
    base: Annotated[str | None, typer.Option(help="Ref of the base this adapter/fine-tune is pinned to.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="key=value; repeatable.")] = None,
    alias: Annotated[list[str] | None, typer.Option("--alias", "-a", help="Alias to point here; repeatable.")] = None,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    no_dedup: Annotated[bool, typer.Option("--no-dedup", help="Upload every file without hashing first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new version as JSON (not its ref).")] = False,
) -> None:
    """Push FOLDER as the next version of NAME; the last line printed is the new ref NAME@VERSION."""
    with _errors(as_json), _client() as rc:
        files = iter_folder(folder)
        total = sum(p.stat().st_size for _, p in files)
        with _progress() as bar:
            tasks = {"hash": bar.add_task("hashing", total=total, visible=not no_dedup),
                     "upload": bar.add_task("uploading", total=total)}
            v = rc.push(folder, name, kind=kind, base=base, tags=_kv(tag), aliases=alias or [],
                        description=description, dedup=not no_dedup,
                        progress=lambda phase, n: bar.advance(tasks[phase], n))
    if as_json:
        _print_json(v)
        return
    out.print(v.ref, markup=False, highlight=False)


def _read_manifest(source: Path) -> dict[str, Any]:
    """A manifest file (``-``: standard input): ``{"files": [{"path", "sha256", "size"}, ...], "tags",
    "aliases", "kind", "base", "description", "parents"}`` (all but ``files`` optional), or only
    the list of files."""
    text = sys.stdin.read() if str(source) == "-" else source.read_text()
    try:
        data = json.loads(text)
    except ValueError as e:
        raise typer.BadParameter(f"{source}: not JSON ({e})") from None
    if isinstance(data, list):
        data = {"files": data}
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
            for f in data["files"]):
        raise typer.BadParameter(f"{source}: expected {{\"files\": [{{\"path\": ..., \"sha256\": ..., "
                                 "\"size\": ...}, ...]} or that list of files")
    return data


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Model name.")],
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="JSON manifest of the files; - reads stdin.")],
    kind: Annotated[str | None, typer.Option(help="base, adapter, finetune or merge (default: inferred).")] = None,
    base: Annotated[str | None, typer.Option(help="Ref of the base this adapter/fine-tune is pinned to.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="key=value; repeatable.")] = None,
    alias: Annotated[list[str] | None, typer.Option("--alias", "-a", help="Alias to point here; repeatable.")] = None,
    description: Annotated[str | None, typer.Option(help="Free text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new version as JSON (not its ref).")] = False,
) -> None:
    """Create the next version of NAME in one request from files the registry already holds
    (by sha256: nothing is uploaded); the last line printed is the new ref NAME@VERSION. Options
    add to (tags, aliases) or replace (kind, base, description) what the manifest says."""
    with _errors(as_json):
        data = _read_manifest(manifest)
        with _client() as rc:
            v = rc.create_version(
                name, data["files"], kind=kind or data.get("kind"), base=base or data.get("base"),
                tags={**(data.get("tags") or {}), **_kv(tag)}, aliases=[*(data.get("aliases") or []), *(alias or [])],
                description=description if description is not None else data.get("description") or "",
                parents=data.get("parents"))
    if as_json:
        _print_json(v)
        return
    out.print(v.ref, markup=False, highlight=False)


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="name, name@VERSION or name@ALIAS.")],
    dest: Annotated[Path, typer.Argument(help="Destination folder.")],
    file: Annotated[list[str] | None, typer.Option("--file", "-f", help="Only these paths; repeatable.")] = None,
    format: Annotated[str, typer.Option("--format", help="native, or for adapters: delta, merged.")] = "native",
    as_json: Annotated[bool, typer.Option("--json", help="Print the version as JSON (not its ref).")] = False,
) -> None:
    """Download a version into DEST and verify every file's sha256."""
    with _errors(as_json), _client() as rc:
        v = rc.get_version(ref)
        listing = (v.files or []) if format == "native" else rc.list_files(v.ref, format)
        files = [f for f in listing if not file or f.path in file]
        with _progress() as bar:
            task = bar.add_task("downloading", total=sum(f.size for f in files))
            rc.pull(v.ref, dest, files=file, format=format, progress=lambda _phase, n: bar.advance(task, n))
    _note(f"{v.ref}: {len(files)} files verified (sha256) in {dest}")
    if as_json:
        _print_json(v)
        return
    out.print(v.ref, markup=False, highlight=False)


@app.command("ls")
def ls(
    prefix: Annotated[str | None, typer.Argument(help="Model name prefix.")] = None,
    model: Annotated[str | None, typer.Option(help="Exact model name.")] = None,
    kind: Annotated[str | None, typer.Option()] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="key=value or key; repeatable (AND).")] = None,
    base: Annotated[str | None, typer.Option(help="Only versions pinned to this base ref.")] = None,
    status: Annotated[str | None, typer.Option()] = None,
    archived: Annotated[bool, typer.Option("--archived", help="Include archived versions.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    models: Annotated[bool, typer.Option("--models", help="List models instead of versions.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List (search) versions, newest first; or models with --models."""
    with _errors(as_json), _client() as rc:
        if models:
            mpage = rc.list_models(prefix=prefix, kind=kind, tags=tag, limit=limit)
            if as_json:
                _print_json(mpage.items)
                return
            table = Table("model", "kind", "latest", "versions", "aliases", "description")
            for m in mpage.items:
                table.add_row(m.name, m.kind, str(m.latest_version or "-"), str(m.version_count),
                              ", ".join(f"{a}→{v}" for a, v in m.aliases.items()), _clip(m.description, 40))
            out.print(table)
            return
        page = rc.search_versions(model=model, prefix=prefix, kind=kind, tags=tag, base=base, status=status,
                                  archived=archived, limit=limit)
    if as_json:
        _print_json(page.items)
        return
    table = Table("ref", "kind", "status", "base", "size", "aliases", "tags", "created")
    for v in page.items:
        table.add_row(v.ref + (" (archived)" if v.archived else ""), v.kind, v.status, v.base or "",
                      human_bytes(v.size), ", ".join(v.aliases), ", ".join(f"{k}={x}" for k, x in v.tags.items()),
                      str(v.created_at)[:19])
    out.print(table)
    if page.next_cursor:
        _note(f"(more: raise --limit; next cursor {page.next_cursor})")


@app.command()
def show(ref: str, as_json: JsonOpt = False) -> None:
    """Show one version: metadata, files, tags, aliases, lineage parents."""
    with _errors(as_json), _client() as rc:
        v = rc.get_version(ref)
    if as_json:
        _print_json(v)
        return
    out.print(f"[bold]{escape(v.ref)}[/bold]  {v.kind}  {v.status}  {v.storage_mode}"
              + ("  [yellow]archived[/yellow]" if v.archived else ""))
    content = v.content_sha256
    if v.storage_mode in ("derived:basis", "derived:plan"):  # pruned: its identity stays that of its pushed files
        source = "basis" if v.storage_mode == "derived:basis" else "compression plan"
        content += f" (of the files as pushed; the files below are rebuilt from the {source}, with their own sha256s)"
    for label, value in (("base", v.base), ("aliases", ", ".join(v.aliases)),
                         ("tags", ", ".join(f"{k}={x}" for k, x in v.tags.items())),
                         ("size", f"{human_bytes(v.size)} in {v.file_count} files"),
                         ("fingerprint", v.fingerprint), ("content sha256", content),
                         ("created", f"{v.created_at} by {v.created_by}"), ("description", v.description)):
        if value:
            out.print(f"  {label:15s} {value}", markup=False, highlight=False)
    for p in v.parents:
        out.print(f"  parent          {p.relation} {p.ref}", markup=False, highlight=False)
    if v.summary:
        out.print("  summary         " + ", ".join(f"{k}={x}" for k, x in v.summary.items()), markup=False,
                  highlight=False)
    table = Table("path", "size", "sha256")
    for f in v.files or []:
        table.add_row(f.path, human_bytes(f.size), f.sha256)
    out.print(table)


@app.command()
def lineage(
    ref: str,
    direction: Annotated[str, typer.Option(help="up (ancestors), down (descendants) or both.")] = "both",
    depth: Annotated[int, typer.Option()] = 25,
    as_json: JsonOpt = False,
) -> None:
    """Show the lineage of a version as a tree (ancestors above, descendants below)."""
    with _errors(as_json), _client() as rc:
        g = rc.lineage(ref, direction=direction, depth=depth)
    if as_json:
        _print_json(g)
        return
    kinds = {n.ref: n.kind for n in g.nodes}
    parents: dict[str, list[tuple[str, str]]] = {}
    children: dict[str, list[tuple[str, str]]] = {}
    for e in g.edges:
        parents.setdefault(e.child, []).append((e.parent, e.relation))
        children.setdefault(e.parent, []).append((e.child, e.relation))
    root = Tree(f"[bold]{escape(g.root)}[/bold] ({kinds.get(g.root)})")

    def grow(node: Tree, ref_: str, links: dict[str, list[tuple[str, str]]], arrow: str, seen: set[str]) -> None:
        for other, rel in sorted(links.get(ref_, [])):
            branch = node.add(escape(f"{arrow} {rel} {other} ({kinds.get(other)})"))
            if other not in seen:
                grow(branch, other, links, arrow, seen | {other})

    if direction in ("up", "both"):
        grow(root, g.root, parents, "↑", {g.root})
    if direction in ("down", "both"):
        grow(root, g.root, children, "↓", {g.root})
    out.print(root)


@app.command()
def archive(ref: str, as_json: JsonOpt = False) -> None:
    """Archive (soft-delete) a version; refused while other versions depend on it."""
    with _errors(as_json), _client() as rc:
        v = rc.archive(ref)
    if as_json:
        _print_json(v)
        return
    out.print(f"{v.ref} archived", markup=False, highlight=False)


@alias_app.command("set")
def alias_set(name: str, alias: str, version: str, as_json: JsonOpt = False) -> None:
    """Point NAME@ALIAS at VERSION (a number or a ref of the same model)."""
    with _errors(as_json), _client() as rc:
        a = rc.set_alias(name, alias, version)
    if as_json:
        _print_json(a)
        return
    out.print(f"{name}@{alias} -> {a.ref}", markup=False, highlight=False)


@alias_app.command("rm")
def alias_rm(name: str, alias: str, as_json: JsonOpt = False) -> None:
    """Remove an alias."""
    with _errors(as_json), _client() as rc:
        rc.delete_alias(name, alias)
    if as_json:
        _print_json({"model": name, "alias": alias, "removed": True})
        return
    out.print(f"{name}@{alias} removed", markup=False, highlight=False)


@alias_app.command("ls")
def alias_ls(name: str, as_json: JsonOpt = False) -> None:
    """List a model's aliases."""
    with _errors(as_json), _client() as rc:
        rows = rc.list_aliases(name)
    if as_json:
        _print_json(rows)
        return
    for a in rows:
        out.print(f"{name}@{a.alias} -> {a.ref}", markup=False, highlight=False)


@tag_app.command("set")
def tag_set(ref: str, pairs: Annotated[list[str], typer.Argument(help="key=value ...")],
            as_json: JsonOpt = False) -> None:
    """Set tags on a version."""
    tags = _kv(pairs)
    with _errors(as_json), _client() as rc:
        v = rc.set_tags(ref, tags)
    if as_json:
        _print_json(v)
        return
    out.print(f"{v.ref}: " + ", ".join(f"{k}={x}" for k, x in v.tags.items()), markup=False, highlight=False)


@tag_app.command("rm")
def tag_rm(ref: str, key: str, as_json: JsonOpt = False) -> None:
    """Remove a tag from a version."""
    with _errors(as_json), _client() as rc:
        v = rc.delete_tag(ref, key)
    if as_json:
        _print_json(v)
        return
    out.print(f"{v.ref}: " + (", ".join(f"{k}={x}" for k, x in v.tags.items()) or "(no tags)"), markup=False,
              highlight=False)


def _wait(rc: RegistryClient, job: Job, wait: bool, as_json: bool = False) -> Job:
    """Print the queued job; with ``wait``, follow it with a progress display to its end. With
    ``as_json`` stdout gets the job (the finished job with ``wait``) as JSON."""
    _note(f"job {job.id} ({job.type}) {job.state}")
    if not wait:
        if as_json:
            _print_json(job)
        else:
            out.print(str(job.id))
        return job
    bar: Progress | _Lines = _Lines() if not err.is_terminal else Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(), console=err)
    with bar:
        task = bar.add_task(f"job {job.id}", total=1.0)

        def update(j: Job) -> None:
            bar.update(task, completed=j.progress, description=f"job {j.id} {j.state}: {_clip(j.message, 60)}")

        done = rc.wait_job(job.id, on_update=update)
    result = done.result or {}
    if isinstance(result.get("error"), int | float):  # a lossy step says what it cost
        _note(f"lossy: relative delta error {result['error']:.4g} against the exact result")
    if result.get("deduplicated"):  # the registry already held this output: say so, not a silent old ref
        _note(result.get("message") or f"{result['ref']} already holds exactly this output")
    if as_json:
        _print_json(done)
    elif result.get("ref"):
        out.print(result["ref"], markup=False, highlight=False)
    else:
        _print_json(result)
    return done


@app.command()
def jobs(
    job_id: Annotated[int | None, typer.Argument(help="One job (omit to list recent jobs).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job to its end.")] = False,
    state: Annotated[str | None, typer.Option(help="Filter: queued, running, succeeded, failed.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Filter: basis, transfer, merge, webhook, ...")] = None,
    limit: int = 20,
    as_json: JsonOpt = False,
) -> None:
    """Show jobs, or one job (with --wait: a progress bar until it finishes)."""
    with _errors(as_json), _client() as rc:
        if job_id is not None:
            job = rc.get_job(job_id)
            if wait:
                _wait(rc, job, True, as_json)
            elif as_json:
                _print_json(job)
            else:
                out.print(f"job {job.id} {job.type} {job.state} {job.progress:.0%} "
                          f"attempts {job.attempts}/{job.max_attempts} {job.message}", markup=False, highlight=False)
                if job.result:
                    _print_json(job.result)
                if job.error:
                    _print_json(job.error)
            return
        rows = rc.list_jobs(state=state, type=type, limit=limit)
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "type", "state", "progress", "attempts", "result / error", "created")
    for j in rows:
        outcome = (j.result or {}).get("ref") or (j.error or {}).get("message", "")
        table.add_row(str(j.id), j.type, j.state, f"{j.progress:.0%}", str(j.attempts),
                      _clip(str(outcome), 50), str(j.created_at)[:19])
    out.print(table)


@basis_app.command("create")
def basis_create(
    members: Annotated[list[str], typer.Option("--members", "-m", help="Adapter refs (≥ 2); repeatable.")],
    p: Annotated[int | None, typer.Option("-p", help="Basis directions per module.")] = None,
    max_error: Annotated[float | None, typer.Option("--max-error", help="Error budget per module.")] = None,
    name: Annotated[str | None, typer.Option(help="Model to hold the basis (default <base>-rmm).")] = None,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit an RMM basis over adapters of one base (a job)."""
    with _errors(as_json), _client() as rc:
        _wait(rc, rc.create_basis(members, p=p, max_error=max_error, name=name), wait, as_json)


@basis_app.command("show")
def basis_show(basis_id: int, as_json: JsonOpt = False) -> None:
    """A basis: its version, p, storage ratio and each member's delta error."""
    with _errors(as_json), _client() as rc:
        b = rc.get_basis(basis_id)
    if as_json:
        _print_json(b)
        return
    ratio = f"{b.storage_ratio:.3f}" if b.storage_ratio is not None else "-"
    out.print(f"basis {b.id} {b.method} {b.status} -> {b.ref} (base {b.base}); "
              f"p={b.p} max_error={b.max_error} storage ratio {ratio}", markup=False, highlight=False)
    table = Table("position", "member", "relative delta error")
    for m in b.members:
        table.add_row(str(m.position), m.ref, f"{m.error:.3e}" if m.error is not None else "-")
    out.print(table)


@basis_app.command("prune")
def basis_prune(
    basis_id: int,
    max_error: Annotated[float | None, typer.Option("--max-error", help="Error budget (0: exact only).")] = None,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Let members within the error budget drop their own blobs and be served from the basis."""
    with _errors(as_json), _client() as rc:
        _wait(rc, rc.prune(basis_id, max_error), wait, as_json)


@basis_app.command("ls")
def basis_ls(collection: Annotated[str | None, typer.Option()] = None, as_json: JsonOpt = False) -> None:
    """List bases, newest first."""
    with _errors(as_json), _client() as rc:
        rows = rc.list_bases(collection)
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "version", "members", "p / max_error", "storage ratio", "max error", "created")
    for b in rows:
        table.add_row(str(b.id), str(b.ref), str(len(b.members)), f"{b.p} / {b.max_error}",
                      f"{b.storage_ratio:.3f}" if b.storage_ratio is not None else "-",
                      f"{max((m.error or 0) for m in b.members):.2e}" if b.members else "-",
                      str(b.created_at)[:19])
    out.print(table)


compress_app = typer.Typer(help="Compression plans: adapters of one base in the fewest bytes within an error budget.",
                           no_args_is_help=True)
app.add_typer(compress_app, name="compress")


def _print_compression(c: Compression) -> None:
    out.print(f"compression {c.id} -> {c.ref} (base {c.base}); max_error {c.max_error}; "
              f"{human_bytes(c.stored_bytes)} stored for {human_bytes(c.original_bytes)} of adapters ({c.ratio:.3f})",
              markup=False, highlight=False)
    table = Table("position", "member", "method", "stored", "original", "error", "error as served",
                  "served from the plan")
    for m in c.members:
        table.add_row(str(m.position), str(m.ref), m.method, human_bytes(m.stored_bytes),
                      human_bytes(m.original_bytes), f"{m.error:.3e}", f"{m.served_error:.3e}",
                      "yes" if m.pruned else ("no" if m.prunable else "no (not within budget as served)"))
    out.print(table)


@compress_app.callback(invoke_without_command=True)
def compress_cmd(
    ctx: typer.Context,
    members: Annotated[list[str] | None, typer.Option("--members", "-m", help="Adapter ref; repeatable.")] = None,
    base: Annotated[str | None, typer.Option(help="Instead of -m: the adapters pinned to this base version "
                                             "that still hold their own blobs.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="With --base: key=value or key; "
                                                  "repeatable (AND).")] = None,
    max_error: Annotated[float | None, typer.Option("--max-error", help="Every member's relative delta error "
                                                    "stays <= this (a fraction; 0: exact).")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", help="quantize, truncate or rmm; repeatable "
                                                     "(default: all).")] = None,
    name: Annotated[str | None, typer.Option(help="Model to hold the plan (default <base>-compressed).")] = None,
    collection: Annotated[str | None, typer.Option()] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Then let the members give up their own blobs and "
                                        "be served rebuilt from the plan.")] = False,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Plan the storage of adapters of one base: per member the fewest bytes whose error stays within
    --max-error (a job). `registry compress show ID` shows a plan; `ls` and `prune` as for bases."""
    if ctx.invoked_subcommand is not None:
        return
    if max_error is None or (not members and base is None):
        raise typer.BadParameter("give -m REF ... (or --base) and --max-error")
    tags = {k: (v if sep else None) for k, sep, v in (t.partition("=") for t in tag or [])} or None
    with _errors(as_json), _client() as rc:
        job = _wait(rc, rc.compress(members or None, max_error=max_error, base=base, tags=tags, methods=method,
                                    name=name, collection=collection, prune=prune), wait, as_json)
        compression_id = (job.result or {}).get("compression_id") if wait else None
        if compression_id is not None:
            c = rc.get_compression(compression_id)
            _note(f"compression {c.id}: {c.stored_bytes} bytes stored for {c.original_bytes} "
                  f"({c.ratio:.3f}); largest member error {max(m.error for m in c.members):.3e}")


@compress_app.command("show")
def compress_show(compression_id: int, as_json: JsonOpt = False) -> None:
    """A plan: its version, budget, bytes and, per member, method, stored bytes and error."""
    with _errors(as_json), _client() as rc:
        c = rc.get_compression(compression_id)
    if as_json:
        _print_json(c)
        return
    _print_compression(c)


@compress_app.command("ls")
def compress_ls(collection: Annotated[str | None, typer.Option()] = None, as_json: JsonOpt = False) -> None:
    """List compression plans, newest first."""
    with _errors(as_json), _client() as rc:
        rows = rc.list_compressions(collection)
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "version", "members", "max_error", "stored", "original", "ratio", "max error", "created")
    for c in rows:
        table.add_row(str(c.id), str(c.ref), str(len(c.members)), str(c.max_error),
                      human_bytes(c.stored_bytes), human_bytes(c.original_bytes), f"{c.ratio:.3f}",
                      f"{max((m.error for m in c.members), default=0.0):.2e}", str(c.created_at)[:19])
    out.print(table)


@compress_app.command("prune")
def compress_prune(
    compression_id: int,
    max_error: Annotated[float | None, typer.Option("--max-error", help="Only members within this error "
                                                    "(default: the plan's budget).")] = None,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Let a plan's members give up their own blobs and be served rebuilt from the plan."""
    with _errors(as_json), _client() as rc:
        _wait(rc, rc.prune_compression(compression_id, max_error), wait, as_json)


@app.command("transfer")
def transfer_cmd(
    ref: Annotated[str, typer.Argument(help="Fine-tune or adapter to transfer.")],
    to: Annotated[str, typer.Option("--to", help="Target base ref.")],
    alpha: Annotated[float, typer.Option(help="Scale of the diff (1 = the paper's default).")] = 1.0,
    derived: Annotated[bool, typer.Option("--derived", help="Keep only the recipe; rebuild on request.")] = False,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Transfer a fine-tune/adapter to a new base version: a candidate version (a job)."""
    with _errors(as_json), _client() as rc:
        _wait(rc, rc.transfer(ref, to, alpha, "derived" if derived else "stored"), wait, as_json)


@app.command("merge")
def merge_cmd(
    inputs: Annotated[list[str], typer.Argument(help="Refs to merge (adapters of one base, or full models).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model to hold the result.")],
    method: Annotated[str, typer.Option(help="task_arithmetic, ties, dare_linear, dare_ties.")] = "ties",
    param: Annotated[list[str] | None, typer.Option("--param", help="lam=0.4 density=0.2 seed=0 weights=1,1")] = None,
    rank: Annotated[int | None, typer.Option(help="Adapters: rank of the merged LoRA.")] = None,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge versions with task arithmetic / TIES / DARE (a job)."""
    params: dict[str, Any] = {}
    with _errors(as_json):
        for k, v in _kv(param, "param").items():
            if k == "weights":
                params[k] = [float(x) for x in v.split(",")]
            elif k in ("seed",):
                params[k] = int(v)
            elif k == "majority_sign":
                params[k] = v
            else:
                params[k] = float(v)
    with _errors(as_json), _client() as rc:
        _wait(rc, rc.merge(method, inputs, name, params, rank), wait, as_json)


@app.command()
def predictions(
    ref: str,
    file: Annotated[Path, typer.Argument(help="JSON: {predictions, labels} or {scores} (one entry per instance).")],
    dataset: Annotated[str, typer.Option(help="Name of the evaluation set.")],
    kind: Annotated[str, typer.Option(help="classification or generative.")] = "classification",
    replace: Annotated[bool, typer.Option("--replace")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Store a version's predictions on an evaluation set (for `registry compat`)."""
    with _errors(as_json), _client() as rc:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object with predictions and labels, or scores")
        r = rc.store_predictions(ref, dataset, kind=kind, predictions=data.get("predictions"),
                                 labels=data.get("labels"), scores=data.get("scores"), replace=replace)
    if as_json:
        _print_json(r)
        return
    out.print(f"{r.ref}: {r.count} {r.kind} predictions on {r.dataset}", markup=False, highlight=False)


@app.command()
def compat(old: str, new: str, dataset: Annotated[str, typer.Option()], as_json: JsonOpt = False) -> None:
    """Update compatibility of OLD -> NEW (MUSCLE: negative flip rate, BTC, ...)."""
    with _errors(as_json), _client() as rc:
        r = rc.compat(old, new, dataset)
    if as_json:
        _print_json(r)
        return
    table = Table("metric", "value")
    for k, v in r.metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(f"{r.old} -> {r.new} on {r.dataset} ({r.kind})", markup=False, highlight=False)
    out.print(table)


@app.command()
def verify(ref: str, as_json: JsonOpt = False) -> None:
    """Recompute and check the sha256 of every file of a version (stored or derived); exit 9 when
    a file does not match."""
    with _errors(as_json), _client() as rc:
        job = rc.wait_job(rc.verify(ref).id)
    result = job.result or {}
    if as_json:
        _print_json(job)
    else:
        for f in result["files"]:
            mark = "[green]ok[/green]" if f["ok"] else "[red]MISMATCH[/red]"
            out.print(f"{mark} " + escape(f"{f['path']} ({f['source']}) {f['actual']}"))
        out.print(f"{result['ref']}: {'verified' if result['ok'] else 'CORRUPT'}", markup=False, highlight=False)
    if not result["ok"]:
        raise typer.Exit(EXIT_INTEGRITY)


@app.command()
def pack(
    ref: str,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the pack job to finish.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pack a version losslessly: tensors kept once, coded against its base or previous version.
    Pulls return the same bytes (same sha256) before, during and after."""
    with _errors(as_json), _client() as rc:
        job = rc.pack(ref)
        if wait:
            job = rc.wait_job(job.id)
    if as_json:
        _print_json(job)
        return
    if not wait:
        out.print(f"job {job.id} queued: pack {ref}", markup=False, highlight=False)
        return
    r = job.result or {}
    if "skipped" in r:
        out.print(f"{ref}: {r['skipped']}", markup=False, highlight=False)
        return
    out.print(f"{r['ref']}: {r['files_packed']} files packed ({r['files_already_packed']} already); "
              f"{human_bytes(r['logical_bytes'])} logical, {human_bytes(r['stored_bytes'])} stored ({r['ratio']:.3f}); "
              f"{r['chunks_new']} new chunks, {r['chunks_reused']} reused", markup=False, highlight=False)


@app.command()
def storage(as_json: JsonOpt = False) -> None:
    """Logical vs physical bytes per model and in total."""
    with _errors(as_json), _client() as rc:
        r = rc.storage()
    if as_json:
        _print_json(r)
        return
    table = Table("model", "versions", "logical", "stored", "ratio")
    for m in r.models:
        table.add_row(m.model, str(m.versions), human_bytes(m.logical_bytes), human_bytes(m.stored_bytes),
                      f"{m.ratio:.3f}")
    t = r.total
    table.add_row("[bold]total[/bold]", "", human_bytes(t.logical_bytes), human_bytes(t.stored_bytes), f"{t.ratio:.3f}")
    out.print(table)
    out.print(f"store: {t.objects} objects, {human_bytes(t.object_bytes)}; {t.packed_files} packed files "
              f"in {t.chunks} chunks; packing {r.pack}", markup=False, highlight=False)


@app.command()
def promote(ref: str, alias: Annotated[str | None, typer.Option(help="Point this alias at it.")] = None,
            as_json: JsonOpt = False) -> None:
    """Promote a candidate version to ready (optionally setting an alias)."""
    with _errors(as_json), _client() as rc:
        v = rc.promote(ref, alias)
    if as_json:
        _print_json(v)
        return
    out.print(f"{v.ref} {v.status}" + (f" ({alias})" if alias else ""), markup=False, highlight=False)


@app.command("export")
def export_cmd(
    ref: Annotated[str, typer.Argument(help="The version to export (name, name@N, name@ALIAS).")],
    oci_dir: Annotated[Path, typer.Option("--oci", help="Write an OCI image layout (CNCF ModelPack) into this "
                                                        "folder (new, empty, or a layout of the same model).")],
    as_json: JsonOpt = False,
) -> None:
    """Export a version as an OCI image layout: push it to any OCI registry with standard tools
    (skopeo copy oci:DIR:N docker://…); `registry import DIR` reads it back byte-exact."""
    with _errors(as_json), _client() as rc:
        v = rc.get_version(ref)
        with _progress() as bar:
            task = bar.add_task("exporting", total=v.size)
            r = rc.export_oci(v.ref, oci_dir, progress=lambda _phase, n: bar.advance(task, n))
    if as_json:
        _print_json(r)
        return
    _note(f"{r.ref}: {r.files} files, {human_bytes(r.size)} in {r.path} (tag {r.tag}, manifest {r.manifest_digest})")
    out.print(f"oci:{r.path}:{r.tag}", markup=False, highlight=False)


@app.command("import")
def import_cmd(
    src: Annotated[Path, typer.Argument(help="An OCI image layout (registry export --oci, or a ModelPack artifact "
                                             "with raw layers).")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Model to import into (default: the "
                                                                   "exported model's name).")] = None,
    tag: Annotated[str | None, typer.Option(help="Which manifest, when the layout holds several.")] = None,
    base: Annotated[str | None, typer.Option(help="Pin to this base instead of the exported one.")] = None,
    no_lineage: Annotated[bool, typer.Option("--no-lineage", help="Drop the exported base and parents (for "
                                                                  "a registry that lacks them).")] = False,
    alias: Annotated[list[str] | None, typer.Option("--alias", "-a", help="Alias to point here; repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new version as JSON (not its ref).")] = False,
) -> None:
    """Import an OCI image layout as the next version of its model: the same files, byte-exact
    (each checked against its layer digest), kind, tags and lineage."""
    from .formats import oci

    with _errors(as_json), _client() as rc, _progress() as bar:
        task = bar.add_task("importing", total=sum(layer.size for layer in oci.read(src, tag).layers))
        v = rc.import_oci(src, name=name, tag=tag, base=base, lineage=not no_lineage, aliases=alias or [],
                          progress=lambda phase, n: bar.advance(task, n) if phase == "upload" else None)
    if as_json:
        _print_json(v)
        return
    out.print(v.ref, markup=False, highlight=False)


@policy_app.command("create")
def policy_create(
    name: str,
    type: Annotated[str, typer.Option("--type", help="transfer_on_base_update, refresh_basis or "
                                      "compress_collection.")],
    base_model: Annotated[str, typer.Option("--base-model", help="The base model the policy watches.")],
    alpha: Annotated[float | None, typer.Option(help="transfer: scale of the diff.")] = None,
    p: Annotated[int | None, typer.Option("-p", help="refresh_basis: directions per module.")] = None,
    max_error: Annotated[float | None, typer.Option("--max-error", help="refresh_basis: error budget.")] = None,
    collection: Annotated[str | None, typer.Option(help="refresh_basis: model holding the basis versions.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="refresh_basis: only adapters with key=value.")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", help="compress_collection: quantize, truncate, "
                                                     "rmm; repeatable (default: all).")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="compress_collection: members then give up their own "
                                        "blobs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an automation policy."""
    params: dict[str, Any] = {}
    if type == "transfer_on_base_update":
        params["alpha"] = 1.0 if alpha is None else alpha
    elif type == "compress_collection":
        params.update({"max_error": max_error, "methods": method, "collection": collection, "tags": _kv(tag),
                       "prune": prune})
    else:
        params.update({"p": p, "max_error": max_error, "collection": collection, "tags": _kv(tag)})
    with _errors(as_json), _client() as rc:
        pol = rc.create_policy(name, type, base_model, params)
    if as_json:
        _print_json(pol)
        return
    out.print(f"policy {pol.name} ({pol.type} on {pol.base_model}) created", markup=False, highlight=False)


@policy_app.command("ls")
def policy_ls(as_json: JsonOpt = False) -> None:
    """List policies."""
    with _errors(as_json), _client() as rc:
        rows = rc.list_policies()
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "type", "base model", "params", "active")
    for pol in rows:
        table.add_row(pol.name, pol.type, pol.base_model, json.dumps(pol.params), str(pol.active))
    out.print(table)


@policy_app.command("rm")
def policy_rm(name: str, as_json: JsonOpt = False) -> None:
    """Delete a policy."""
    with _errors(as_json), _client() as rc:
        rc.delete_policy(name)
    if as_json:
        _print_json({"policy": name, "removed": True})
        return
    out.print(f"policy {name} removed", markup=False, highlight=False)


@webhook_app.command("create")
def webhook_create(
    url: str,
    event: Annotated[list[str], typer.Option("--event", "-e", help="Event type pattern (repeatable): version.*, "
                                             "job.failed, *.")],
    secret: Annotated[str | None, typer.Option(help="Signing secret (16-256 chars; for standard-webhooks "
                                                    "whsec_ + base64 of 24-64 bytes; generated when omitted).")] = None,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    signature_scheme: Annotated[str, typer.Option(
        "--signature-scheme", help="registry (X-Registry-Signature, the default) or standard-webhooks "
                                   "(webhook-id / webhook-timestamp / webhook-signature).")] = "registry",
    as_json: JsonOpt = False,
) -> None:
    """Subscribe URL to events; prints the signing secret (shown only once)."""
    with _errors(as_json), _client() as rc:
        w = rc.create_webhook(url, event, secret=secret, description=description, signature_scheme=signature_scheme)
    if as_json:
        _print_json(w)
        return
    out.print(f"webhook {w.id} -> {w.url} ({', '.join(w.events)}; {w.signature_scheme} signatures) created",
              markup=False, highlight=False)
    out.print(f"secret: {w.secret}  (store it now: it is not shown again)", markup=False, highlight=False)


@webhook_app.command("ls")
def webhook_ls(as_json: JsonOpt = False) -> None:
    """List webhooks."""
    with _errors(as_json), _client() as rc:
        rows = rc.list_webhooks()
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "url", "events", "signature", "active", "description")
    for w in rows:
        table.add_row(str(w.id), w.url, ", ".join(w.events), w.signature_scheme, str(w.active), w.description)
    out.print(table)


@webhook_app.command("rm")
def webhook_rm(webhook_id: int, as_json: JsonOpt = False) -> None:
    """Delete a webhook and its delivery log."""
    with _errors(as_json), _client() as rc:
        rc.delete_webhook(webhook_id)
    if as_json:
        _print_json({"webhook": webhook_id, "removed": True})
        return
    out.print(f"webhook {webhook_id} removed")


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook_id: int,
    status: Annotated[str | None, typer.Option(help="pending, succeeded or failed.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """A webhook's delivery log (newest first)."""
    with _errors(as_json), _client() as rc:
        rows = rc.list_deliveries(webhook_id, status=status, limit=limit)
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "event", "type", "status", "attempts", "last code", "last error", "delivered")
    for d in rows:
        table.add_row(str(d.id), str(d.event_id), d.event_type or "", d.status, str(d.attempts),
                      str(d.last_status_code or ""), _clip(d.last_error or "", 60), str(d.delivered_at or ""))
    out.print(table)


@webhook_app.command("delivery")
def webhook_delivery(delivery_id: int, as_json: JsonOpt = False) -> None:
    """One delivery with its per-attempt log (JSON, with or without --json)."""
    with _errors(as_json), _client() as rc:
        _print_json(rc.get_delivery(delivery_id))


@webhook_app.command("redeliver")
def webhook_redeliver(delivery_id: int, as_json: JsonOpt = False) -> None:
    """Send a delivery again (same delivery id, new job)."""
    with _errors(as_json), _client() as rc:
        r = rc.redeliver(delivery_id)
    if as_json:
        _print_json(r)
        return
    out.print(f"delivery {delivery_id} queued again (job {r.job.id})")


if __name__ == "__main__":  # pragma: no cover
    run()
