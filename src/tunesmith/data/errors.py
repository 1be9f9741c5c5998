"""A located, actionable data error: which file, which row, which field, what to do."""

from __future__ import annotations


class DataError(Exception):
    def __init__(self, message: str, file: str | None = None, row: int | None = None, field: str | None = None,
                 fix: str | None = None, reason: str = "bad row"):
        self.message, self.file, self.row, self.field, self.fix = message, file, row, field, fix
        self.reason = reason  # short key used to count skipped rows by cause
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ", ".join(p for p in (self.file, f"row {self.row}" if self.row is not None else None,
                                      f"field `{self.field}`" if self.field else None) if p)
        text = f"{where}: {self.message}" if where else self.message
        return text + (f"\n  fix: {self.fix}" if self.fix else "")
