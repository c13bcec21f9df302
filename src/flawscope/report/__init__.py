"""HTML evaluation report: metrics side by side, ROC / PR curves, worst-example overlays."""

from flawscope.report.html import write_report

__all__ = ["write_report"]
