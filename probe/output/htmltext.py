"""Text in the HTML report's tables: escaped, with line-break opportunities inside long names."""

from __future__ import annotations

import html
import re


def breakable(text) -> str:
    """`text` escaped, with a break opportunity (<wbr>) after each '/', '.' and '_', so that long folder,
    model and layer names wrap inside their table cell instead of widening the page."""
    return re.sub(r"([/._])", r"\1<wbr>", html.escape(str(text)))
