"""Output for people and spreadsheets: nothing stored can drive a terminal or run a formula.

Every text the CLI prints goes through :func:`terminal_safe`; every CSV cell
the export writes goes through :func:`csv_cell`; the JSON exports are written
with :func:`json_text`; the web console shows stored text through
:func:`terminal_safe` too. Task names, hostnames, custom states, exception
messages and ids are chosen by whoever can send a task, so they are data, never
control.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls but tab and newline (ESC starts CSI/OSC sequences, CR overwrites a
# line), DEL, C1 controls (U+009B is a one-character CSI on some terminals), the
# bidirectional overrides that reorder what a line appears to say, and lone
# surrogates (a file name decoded with surrogateescape, JSON's "\ud800"): no
# UTF-8 output can hold one, so printing it raised UnicodeEncodeError.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
#: A lone surrogate: no UTF-8 text, terminal or database holds one. Python hands a
#: byte that is not UTF-8 over as one (argv, the environment, a file name: PEP 383).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")

#: OWASP's CSV injection rule: a cell starting with one of these is a formula to
#: Excel, LibreOffice or Google Sheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def terminal_safe(text: str) -> str:
    r"""``text`` with every control character shown as an escape (``\x1b``, ``\u202e``)."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def json_text(value: Any, **options: Any) -> str:
    r"""``json.dumps(value, ensure_ascii=False, **options)`` that UTF-8 can hold: a lone
    surrogate is written as JSON's own escape (``\ud800``, as ``ensure_ascii`` writes
    it), so the text stays valid JSON and reads back as the value stored."""
    # A surrogate can only be inside a JSON string, where \uXXXX is its escape.
    return LONE_SURROGATE.sub(_escape, json.dumps(value, ensure_ascii=False, **options))


def csv_cell(value: Any) -> Any:
    """A text cell with its control characters escaped as :func:`terminal_safe` does (a
    CSV is read in terminals too: ``cat``, ``less -r``), and a leading ``'`` if a
    spreadsheet would run it as a formula; numbers stay numbers. Tabs and
    newlines (tracebacks) stay; the JSON exports keep every value as stored."""
    if isinstance(value, str):
        value = terminal_safe(value)
        if value.startswith(FORMULA_START):
            return "'" + value
    return value
