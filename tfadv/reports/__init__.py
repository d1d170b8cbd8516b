"""Views of evaluation results: Markdown reports, plots and tables.

The evaluators (`tfadv.evaluation`) return data; the writers here turn the
JSON form of that data (`to_dict()`, as saved in `metrics.json`) into what
people read, so a committed `metrics.json` can be re-rendered at any time.
"""

from tfadv.reports import facenet

__all__ = ["facenet"]
