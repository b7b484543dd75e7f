"""Making attacker-controlled text safe to show, and getting its bytes back.

Process names and command lines are chosen by whoever started the process.
On a terminal or in a one-line log they must not be able to move the cursor,
change colours, start a new line or hide text, so every control character,
every non-UTF-8 byte and the backslash itself are written as escapes.
"""

from __future__ import annotations

import unicodedata

# Named escapes for the common controls; everything else becomes \xNN or \uNNNN.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    r"""Return `text` with nothing a terminal would interpret.

    Control characters (C0, DEL, C1), line and paragraph separators,
    bidirectional overrides and other format characters are escaped, and
    surrogate escapes of undecodable bytes become `\xNN`:

    >>> escape("evil\x1b[31m\nname")
    'evil\\x1b[31m\\nname'
    """
    if is_plain(text):
        return text  # the common case, and far cheaper than looking at each character
    out: list[str] = []
    for ch in text:
        named = _NAMED.get(ch)
        if named is not None:
            out.append(named)
            continue
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"}:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def is_plain(text: str) -> bool:
    """True when `escape` leaves `text` as it is: printable ASCII without a backslash.

    Of a concatenation, true only when true of every part.
    """
    return text.isascii() and text.isprintable() and "\\" not in text


def decode(raw: bytes) -> str:
    """Decode bytes from /proc losslessly: invalid UTF-8 becomes surrogate escapes."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    """The exact bytes behind a string made by `decode`."""
    return text.encode("utf-8", "surrogateescape")
