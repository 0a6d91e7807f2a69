"""What a loader read and what it skipped: malformed rows are reported, never fatal."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """One malformed input row: the file, its 1-based line number and why it was skipped."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(slots=True)
class LoadReport:
    """Rows read and rows skipped while loading one data set."""

    rows_read: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    def skip(self, file: str, line: int, reason: str) -> None:
        row = SkippedRow(file, line, reason)
        self.skipped.append(row)
        # Log the first few only: a badly broken file should not flood the log.
        if len(self.skipped) <= 10:
            logger.warning("skipped malformed row %s", row)
