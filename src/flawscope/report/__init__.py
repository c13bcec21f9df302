"""HTML evaluation report: metrics side by side, ROC / PR curves, worst-example overlays."""

from flawscope.report.html import write_report
from flawscope.report.types import write_type_report

__all__ = ["write_report", "write_type_report"]
