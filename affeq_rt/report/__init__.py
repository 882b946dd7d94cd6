"""Reports: tables, figures and HTML drawn from evaluation results (``method.results``).

``write_report(table, out)`` is the entry point; it reads results and computes nothing new.
"""

from affeq_rt.report.html import html_table
from affeq_rt.report.tables import markdown_table, text_table
from affeq_rt.report.write import write_report

__all__ = ["html_table", "markdown_table", "text_table", "write_report"]
