"""How byte counts are written for people (the CLI's tables and the web UI's pages)."""

from __future__ import annotations


def human_bytes(n: int | None) -> str:
    """``n`` bytes in binary units: ``"512 B"``, ``"17.4 KiB"``, ``"1.2 GiB"``; ``""`` for None."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)
