"""What a conformance run reports: one :class:`CheckRecord` per check, and :class:`SkipCheck`
for a check that does not apply (kept apart so adapter and metric checks share them)."""

from __future__ import annotations

import unittest
from dataclasses import dataclass

__all__ = ["SkipCheck", "CheckRecord"]


class SkipCheck(unittest.SkipTest):
    """A check that does not apply to this plugin (pytest shows it as skipped)."""


@dataclass
class CheckRecord:
    """One check's outcome: ``status`` is passed, failed, skipped, xfail or xpass.

    ``reason``: why it failed, was skipped or is expected to fail; for a pass, what the check
    measured (e.g. the largest deviation from the reference), if it says.
    """

    check: str
    status: str
    exception: BaseException | None = None
    reason: str = ""
