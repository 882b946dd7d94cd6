"""Text that came from a file (label names, metadata, file names), made safe to print.

A hybrid's label names, a store's image paths or an error naming a file can hold anything: an
escape sequence that recolours or rewrites the terminal, a newline that splits a one-line error,
bytes that are not UTF-8. :func:`printable` is the one place that turns such text into something
a terminal shows literally.
"""

from __future__ import annotations

import os
import unicodedata

#: Invisible characters that reorder or hide text (bidi controls, zero-width marks).
_INVISIBLE = frozenset("\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                       "\u2066\u2067\u2068\u2069\ufeff")


def _escape(ch: str) -> str:
    n = ord(ch)
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{n - 0xDC00:02x}"
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: object) -> str:
    """``text`` (or ``str(text)``) with every control, separator, bidi or undecodable character
    written as a Python-style escape (``\\x1b``, ``\\n``, ``\\u2028``, ``\\xff``): what a terminal
    prints is exactly what the string holds, on one line. Plain text is returned unchanged."""
    s = os.fsdecode(text) if isinstance(text, bytes) else str(text)
    if s.isprintable() and not _INVISIBLE.intersection(s):
        return s
    out = []
    for ch in s:
        if ch.isprintable() and ch not in _INVISIBLE:
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ch == " " or unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(_escape(ch))
    return "".join(out)
