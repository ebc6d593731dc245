"""Property-based conformance of the live OpenAPI schema (schemathesis): every operation, bounded
and derandomized examples, against a real server subprocess (SQLite, loopback, no auth).

Checks: no 5xx, every status documented for its operation, documented content types, and bodies
matching the documented schemas (errors included: ``{"error": {"code", "message", "details"}}``).
The server holds a base, an adapter pinned to it and a fine-tune, and the schema's path parameters
get those as examples, so the examples phase (and fuzzing around it) reaches real versions and
files, not only 404s. Downloads are real but small (the demo checkpoints are < 1 MB).

Run alone: ``python3 -m pytest -q -s tests/test_schemathesis.py`` (``-s`` prints the tally).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Server, make_server

pytestmark = pytest.mark.slow  # about a minute on two busy cores

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 25
# Path parameters -> values that exist on the seeded server.
EXAMPLES = {"name": "st-base", "v": "1", "ref": "st-base@1", "path": "model.safetensors", "alias": "production",
            "key": "stage"}

_calls: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def api_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str],
               demo: dict[str, Path]) -> Iterator[Server]:
    srv = make_server(request, tmp_path_factory, pg_databases, "sqlite")
    with srv.client() as rc:
        rc.push(demo["base"], "st-base", tags={"stage": "dev"}, aliases=["production"])
        rc.push(demo["adapter-sql"], "st-lora", base="st-base@1")
        rc.push(demo["finetune"], "st-chat", base="st-base@1")
    yield srv
    ops = {label for label, _ in _calls}
    statuses = Counter(status for (_, status), n in _calls.items() for _ in range(n))
    print(f"\nschemathesis: {len(ops)} operations, {sum(_calls.values())} requests, "
          f"statuses {dict(sorted(statuses.items()))}")


def _with_examples(raw: dict[str, Any]) -> None:
    for item in raw["paths"].values():
        for op in item.values():
            for p in op.get("parameters", []):
                if p["in"] == "path" and p["name"] in EXAMPLES:
                    p["example"] = EXAMPLES[p["name"]]


@pytest.fixture(scope="module")
def api_schema(api_server: Server):  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    _with_examples(schema.raw_schema)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: schemathesis.Case) -> None:
    response = case.call_and_validate(checks=CHECKS, timeout=30)
    _calls[(case.operation.label, response.status_code)] += 1
