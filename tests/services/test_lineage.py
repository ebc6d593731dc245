"""The lineage graph in process: edges recorded at commit, walked up, down and both ways.

The real-HTTP tests stay for the protocol; these call :mod:`registry.services.lineage` directly.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry.errors import InvalidInput, NotFound
from registry.services import lineage, versions

from .inproc import InProcess

pytestmark = pytest.mark.services


def _edges(g: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(e["child"], e["parent"], e["relation"]) for e in g["edges"]}


def _family(reg: InProcess) -> None:
    """llm@1 <- lora@1 (adapter_of); llm@1, other@1 <- merged@1 (merge_of); merged@1 <- tuned@1 (finetune_of)."""
    base = reg.push_base("llm")
    reg.push_adapter("lora", base=base.ref)
    reg.push_weights("other", 2)
    reg.push_weights("merged", 3, parents=[{"ref": "llm@1", "relation": "merge_of", "params": {"weight": 0.5}},
                                           {"ref": "other@1"}])
    reg.push_weights("tuned", 4, parents=[{"ref": "merged@1", "relation": "finetune_of"}])


def test_parents_are_recorded_with_relation_and_params(reg: InProcess) -> None:
    _family(reg)
    v = versions.get(reg.ctx, "merged@1")
    assert [(p.ref, p.relation, p.params) for p in v.parents] == [
        ("llm@1", "merge_of", {"weight": 0.5}), ("other@1", "merge_of", {})]


def test_graph_up_down_and_both(reg: InProcess) -> None:
    _family(reg)
    up = lineage.graph(reg.ctx, "tuned@1", direction="up")
    assert up["root"] == "tuned@1" and not up["truncated"]
    assert _edges(up) == {("tuned@1", "merged@1", "finetune_of"), ("merged@1", "llm@1", "merge_of"),
                          ("merged@1", "other@1", "merge_of")}
    assert [n["ref"] for n in up["nodes"]] == ["llm@1", "merged@1", "other@1", "tuned@1"]

    down = lineage.graph(reg.ctx, "llm@1", direction="down")
    assert _edges(down) == {("lora@1", "llm@1", "adapter_of"), ("merged@1", "llm@1", "merge_of"),
                            ("tuned@1", "merged@1", "finetune_of")}

    both = lineage.graph(reg.ctx, "merged@1")
    assert {n["ref"] for n in both["nodes"]} == {"llm@1", "other@1", "merged@1", "tuned@1"}
    shallow = lineage.graph(reg.ctx, "llm@1", direction="down", depth=1)
    assert {n["ref"] for n in shallow["nodes"]} == {"llm@1", "lora@1", "merged@1"}
    assert lineage.graph(reg.ctx, "llm@1", depth=0)["edges"] == []


def test_nodes_show_kind_status_and_archived(reg: InProcess) -> None:
    _family(reg)
    versions.archive(reg.ctx, "tuned@1", actor="alice")
    nodes = {n["ref"]: n for n in lineage.graph(reg.ctx, "merged@1", direction="down")["nodes"]}
    assert nodes["tuned@1"]["archived"] and not nodes["merged@1"]["archived"]
    assert nodes["merged@1"]["kind"] == "base" and nodes["merged@1"]["status"] == "ready"


def test_bad_graph_requests(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    with pytest.raises(InvalidInput) as e:
        lineage.graph(reg.ctx, "m@1", direction="sideways")
    assert e.value.code == "invalid_direction"
    with pytest.raises(InvalidInput) as e:
        lineage.graph(reg.ctx, "m@1", depth=101)
    assert e.value.code == "invalid_depth"
    with pytest.raises(NotFound):
        lineage.graph(reg.ctx, "m@2")


def test_parent_must_exist_and_be_live(reg: InProcess) -> None:
    reg.push_weights("p", 1)
    versions.archive(reg.ctx, "p@1", actor="alice")
    for ref in ("p@1", "ghost@1"):
        with pytest.raises(InvalidInput) as e:
            reg.push_weights("child", 2, parents=[{"ref": ref}])
        assert e.value.code == "unknown_parent"
