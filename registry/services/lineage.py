"""The lineage graph: versions as nodes, typed edges child -> parent (multi-parent allowed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from ..errors import InvalidInput
from ..models import LineageEdge, Model, ModelVersion
from .context import RegistryContext
from .refs import resolve

MAX_NODES = 5000


def graph(ctx: RegistryContext, ref: str, *, direction: str = "both", depth: int = 25) -> dict[str, Any]:
    """Ancestors (``up``), descendants (``down``) or both of a version, as JSON nodes and edges.

    Breadth-first, one query per level and direction; stops at ``depth`` levels or MAX_NODES."""
    if direction not in ("up", "down", "both"):
        raise InvalidInput("direction must be up, down or both", code="invalid_direction")
    if not 0 <= depth <= 100:
        raise InvalidInput("depth must be between 0 and 100", code="invalid_depth")
    with ctx.db.read() as s:
        root = resolve(s, ref)
        seen: set[int] = {root.id}
        edges: dict[int, LineageEdge] = {}
        truncated = False
        for walk_up in ([True] if direction == "up" else [False] if direction == "down" else [True, False]):
            frontier = {root.id}
            for _ in range(depth):
                if not frontier:
                    break
                col = LineageEdge.child_id if walk_up else LineageEdge.parent_id
                found = list(s.scalars(select(LineageEdge).where(col.in_(frontier))))
                nxt: set[int] = set()
                for e in found:
                    edges[e.id] = e
                    other = e.parent_id if walk_up else e.child_id
                    if other not in seen:
                        seen.add(other)
                        nxt.add(other)
                if len(seen) > MAX_NODES:
                    truncated = True
                    break
                frontier = nxt
        rows = s.execute(
            select(ModelVersion, Model.name).join(Model, Model.id == ModelVersion.model_id)
            .where(ModelVersion.id.in_(seen)))
        nodes = {}
        for v, name in rows:
            nodes[v.id] = {
                "id": v.id, "ref": f"{name}@{v.version}", "model": name, "version": v.version, "kind": v.kind,
                "status": v.status, "storage_mode": v.storage_mode, "archived": v.archived_at is not None,
            }
        out_edges = [
            {"child": nodes[e.child_id]["ref"], "parent": nodes[e.parent_id]["ref"], "relation": e.relation,
             "params": e.params or {}}
            for e in sorted(edges.values(), key=lambda e: e.id)
            if e.child_id in nodes and e.parent_id in nodes
        ]
        return {"root": root.ref, "nodes": sorted(nodes.values(), key=lambda n: (n["model"], n["version"])),
                "edges": out_edges, "truncated": truncated}
