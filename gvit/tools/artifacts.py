"""What the jobs write besides models and Gaussians: figures, tables and HTML pages, all atomic."""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path

from ..files import atomic_path, write_text

__all__ = ["pyplot", "save_figure", "markdown_table", "write_csv", "html_page", "html_table"]


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(path: str | os.PathLike, fig) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (cells as given, stringified)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, header: list[str], rows: list) -> None:
    """A CSV file of ``rows`` (lists, or dicts keyed by ``header``), atomically."""
    buf = io.StringIO()
    if rows and isinstance(rows[0], dict):
        writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in header} for row in rows)
    else:
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def html_table(rows: list[tuple]) -> str:
    """An HTML table of rows (name, value, ...), the first cell of each a header cell; escaped."""
    return "\n".join(f"<tr><th>{html.escape(str(row[0]))}</th>"
                     + "".join(f"<td>{html.escape(str(v))}</td>" for v in row[1:]) + "</tr>" for row in rows)


def html_page(path: str | os.PathLike, title: str, body: str, *, style: str = "") -> None:
    """A self-contained HTML page (``body`` is HTML), atomically."""
    write_text(Path(path), f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} th{{text-align:left;padding-right:1em}}
img{{max-width:100%}} details{{margin-top:2em}} figure{{margin:0 0 2em 0}}{style}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
""")
