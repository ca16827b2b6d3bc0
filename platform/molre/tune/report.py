"""Render a leaderboard to Markdown and to one self-contained HTML page.

The leaderboard is built once as a list of blocks (headings, paragraphs, bullet lists, tables of strings,
PNG images); this module turns that list into

- Markdown: the tables as GitHub pipe tables, images as links to the PNG files written next to it;
- HTML: the same tables, images embedded as ``data:image/png;base64`` and the CSS inline, so the page opens
  from a bucket, a mail attachment or an air-gapped laptop with no network and no other file.

Every piece of text is escaped here (HTML) or has its pipes escaped (Markdown); callers pass plain text.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str  # one paragraph of plain text


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame  # cells already formatted as strings
    caption: str = ""


@dataclass(frozen=True)
class Image:
    name: str  # file name written next to the report (e.g. "radar_dinov3-base.png")
    png: bytes
    caption: str


Block = Heading | Text | Bullets | Table | Image


# ---- Markdown ----------------------------------------------------------------------------------------------


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub pipe table; an empty frame becomes a one-line note instead of a header with no rows."""
    if frame.empty:
        return "_(no rows)_"
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        caption = f"{block.caption}\n\n" if block.caption else ""
        return caption + markdown_table(block.frame)
    return f"![{block.caption}]({block.name})\n\n_{block.caption}_"


def render_markdown(title: str, blocks: list[Block]) -> str:
    return "\n\n".join([f"# {title}", *(_md_block(b) for b in blocks)]) + "\n"


# ---- HTML --------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1b1f23; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
nav ul { columns: 2; font-size: .95em; }
table { border-collapse: collapse; margin: .8em 0 1.4em; font-size: .88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaecef; }
figcaption { font-style: italic; color: #57606a; font-size: .9em; }
p.note { color: #57606a; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def html_table(frame: pd.DataFrame, caption: str = "") -> str:
    if frame.empty:
        return f'<p class="note">{html.escape(caption + " " if caption else "")}(no rows)</p>'
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(image: Image) -> str:
    data = base64.b64encode(image.png).decode("ascii")
    alt = html.escape(image.caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{html.escape(image.caption)} ({html.escape(image.name)})</figcaption></figure>"
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        level = min(max(block.level, 2), 6)
        return f'<h{level} id="{_slug(block.text)}">{html.escape(block.text)}</h{level}>'
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        return html_table(block.frame, block.caption)
    return _html_image(block)


def _nav(blocks: list[Block]) -> str:
    links = [
        f'<li><a href="#{_slug(b.text)}">{html.escape(b.text)}</a></li>'
        for b in blocks
        if isinstance(b, Heading) and b.level == 2
    ]
    return f"<nav><ul>{''.join(links)}</ul></nav>" if links else ""


def render_html(title: str, blocks: list[Block]) -> str:
    """One page, no external assets: inline CSS, base64 images, no scripts, no fonts or links to fetch."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{_nav(blocks)}\n{body}\n</body></html>\n"
    )
