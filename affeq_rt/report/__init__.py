"""Reports: tables, figures and HTML from evaluation results."""
