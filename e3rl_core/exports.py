"""Table exports every writer shares: CSV that a spreadsheet cannot run as formulas."""
from __future__ import annotations

from csv import QUOTE_NONNUMERIC
from pathlib import Path
from typing import Any

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every text cell that a spreadsheet would run as a formula (one beginning with
    ``= + - @``, a tab or a carriage return) prefixed with ``'``, as OWASP recommends against CSV
    injection. Numbers stay numbers; the JSONL exports keep the raw text."""
    def safe(value: Any) -> Any:
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value

    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_object_dtype(out[col]) or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(safe)
    return out


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Spreadsheet-safe CSV with every text cell quoted (a cell holding a line break stays one cell)."""
    spreadsheet_safe(df).to_csv(path, index=False, quoting=QUOTE_NONNUMERIC)
