"""[any] Column names as Spark SQL needs them: any name Spark accepts, quoted.

``F.col("sensor.temp")`` reads the field ``temp`` of a struct ``sensor``; a column whose name has
a dot, a space or a backtick must be quoted with backticks (a backtick inside doubled).
"""

from __future__ import annotations

__all__ = ["quote_column"]


def quote_column(name: str) -> str:
    """``name`` quoted for ``F.col`` / ``df.select``: ``a.b`` → ```a.b```, ``x`y`` → ```x``y```."""
    return "`" + name.replace("`", "``") + "`"
