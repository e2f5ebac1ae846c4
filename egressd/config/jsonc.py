"""JSON with comments, as KumoMTA reads a JSON sources file (the json_comments crate).

``// line``, ``/* block */`` and ``# shell-style`` comments outside strings become spaces
(newlines kept, so a JSON error still names the right line); the rest is plain JSON, read
by :func:`json.loads`. Trailing commas stay an error, as in KumoMTA.
"""

from __future__ import annotations


def strip_json_comments(text: str) -> str:
    """``text`` with every comment outside a string replaced by blanks."""
    out: list[str] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char == '"':
            end = _string_end(text, index)
            out.append(text[index:end])
            index = end
        elif char == "#" or text.startswith("//", index):
            end = text.find("\n", index)
            end = length if end < 0 else end
            out.append(" " * (end - index))
            index = end
        elif text.startswith("/*", index):
            end = text.find("*/", index + 2)
            end = length if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[index:end]))
            index = end
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _string_end(text: str, start: int) -> int:
    """The index just past the JSON string that opens at ``start`` (or the end of text)."""
    index = start + 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
        elif text[index] == '"':
            return index + 1
        else:
            index += 1
    return len(text)
