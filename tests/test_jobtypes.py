"""The job table: every type's parameters are checked where the job is made and where it runs,
rows keep the keys their creators wrote (rows queued by earlier releases still parse), and every
type's handler can be found."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from registry.config import Settings
from registry.errors import InvalidInput
from registry.models import Base
from registry.services import jobs
from registry.services.jobtypes import (
    JOB_TYPES,
    BasisParams,
    BasisQuery,
    JobParams,
    MergeParams,
    TransferParams,
    VerifyParams,
    WebhookParams,
    parse_params,
    type_of,
)
from registry.services.runner import load_handler

# Rows as the job creators wrote them before the parameters had models: each must still parse.
OLD_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("basis", {"members": ["a@1", "b@1"], "p": 2, "max_error": None, "name": None, "collection": None}),
    ("basis", {"query": {"base": "base@1", "tags": {"team": None}}, "p": None, "max_error": 0.1,
               "collection": "c", "name": None}),
    ("transfer", {"finetune": "ft@1", "target_base": "base@2", "alpha": 1.0, "storage": "derived"}),
    ("transfer", {"finetune": "ft@1", "target_base": "base@2", "alpha": 0.5}),
    ("merge", {"method": "ties", "inputs": ["a@1", "b@1"], "name": "m", "params": {"density": 0.5}, "rank": None}),
    ("prune", {"basis_id": 3, "max_error": 0.05}),
    ("prune", {"compression_id": 2, "max_error": 0.05}),
    ("compress", {"members": ["a@1", "b@1"], "max_error": 0.05}),
    ("compress", {"query": {"base": "base@1", "tags": {}}, "max_error": 0.1, "methods": ["quantize"],
                  "collection": "c", "prune": True}),
    ("verify", {"version_id": 7, "ref": "m@1"}),
    ("mlflow_sync", {"version_id": 7}),
    ("webhook", {"delivery_id": 4, "webhook_id": 2, "event_id": 9}),
    ("webhook", {"delivery_id": 4}),
]


@pytest.mark.parametrize(("type_", "row"), OLD_ROWS)
def test_rows_written_before_the_models_parse_and_write_back_the_same(type_: str, row: dict[str, Any]) -> None:
    params = parse_params(type_, row)
    assert type_of(params) == type_
    assert params.to_row() == row


def test_a_row_keeps_only_the_fields_its_creator_set() -> None:
    policy = TransferParams(finetune="ft@1", target_base="base@2", alpha=1.0)
    assert policy.to_row() == {"finetune": "ft@1", "target_base": "base@2", "alpha": 1.0}
    assert parse_params("transfer", policy.to_row()) == TransferParams(finetune="ft@1", target_base="base@2")
    q = BasisParams(query=BasisQuery(base="b@1", tags={}), p=1, max_error=None, collection="c", name=None)
    assert q.to_row() == {"query": {"base": "b@1", "tags": {}}, "p": 1, "max_error": None, "collection": "c",
                          "name": None}


@pytest.mark.parametrize(("type_", "row"), [
    ("transfer", {"finetune": "ft@1"}),                                      # a field missing
    ("transfer", {"finetune": "ft@1", "target_base": "b@2", "alhpa": 2.0}),  # a field misspelt
    ("transfer", {"finetune": "ft@1", "target_base": "b@2", "storage": "s3"}),
    ("prune", {"basis_id": "three", "max_error": 0.1}),
    ("prune", {"max_error": 0.1}),                                           # neither basis nor plan
    ("prune", {"basis_id": 1, "compression_id": 2, "max_error": 0.1}),       # both
    ("compress", {"members": ["a@1"]}),                                      # no budget
    ("compress", {"max_error": 0.1}),                                        # neither members nor query
    ("basis", {"p": 1}),                                                     # neither members nor query
    ("basis", {"members": ["a@1"], "query": {"base": "b@1"}, "p": 1}),       # both
])
def test_rows_that_do_not_fit_their_type_are_refused(type_: str, row: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_params(type_, row)
    assert e.value.code == "invalid_job_params"


def test_unknown_types_and_foreign_params_are_refused() -> None:
    with pytest.raises(InvalidInput) as e:
        parse_params("bake_cake", {})
    assert e.value.code == "invalid_job_type"

    class Stray(JobParams):
        x: int

    with pytest.raises(InvalidInput) as e:
        type_of(Stray(x=1))
    assert e.value.code == "invalid_job_type"


def test_every_type_has_its_own_params_model_and_a_handler() -> None:
    models = [jt.params for jt in JOB_TYPES.values()]
    assert len(set(models)) == len(models)  # the type of a job is read off its params
    for name in JOB_TYPES:
        assert callable(load_handler(name)), name


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_create_writes_the_type_queue_and_row(session: Session) -> None:
    cpu = Settings(gpu_workers=False)
    gpu = Settings(gpu_workers=True)
    job, created = jobs.create(session, MergeParams(method="ties", inputs=["a@1"], name="m"), settings=gpu)
    assert created and (job.type, job.queue) == ("merge", "gpu")
    assert job.params == {"method": "ties", "inputs": ["a@1"], "name": "m"}
    job, _ = jobs.create(session, MergeParams(method="ties", inputs=["a@1"], name="m"), settings=cpu)
    assert job.queue == "cpu"
    job, _ = jobs.create(session, VerifyParams(version_id=1), settings=gpu)
    assert (job.type, job.queue) == ("verify", "cpu")
    job, _ = jobs.create(session, WebhookParams(delivery_id=1, webhook_id=2, event_id=3), settings=gpu,
                         idempotency_key="k")
    again, created = jobs.create(session, WebhookParams(delivery_id=1), settings=gpu, idempotency_key="k")
    assert (again.id, created) == (job.id, False)


def test_create_checks_the_params_read_back(session: Session) -> None:
    # made without validation (model_construct): the row would not parse where the job runs
    bad = TransferParams.model_construct(finetune="ft@1", target_base=None)
    with pytest.raises(InvalidInput) as e:
        jobs.create(session, bad, settings=Settings())
    assert e.value.code == "invalid_job_params"
