"""What the report's modules share: groups of like rows, values as text, markdown tables, saved figures."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend


def groups(df: pd.DataFrame, keys: Sequence[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    """({key: value}, rows) per group of rows alike in `keys`, sorted, a missing value a group of its own; without
    keys, one group of all rows."""
    if not keys:
        yield {}, df
        return
    for values, group in df.groupby(list(keys), dropna=False, sort=True):
        yield dict(zip(keys, values)), group


def text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
