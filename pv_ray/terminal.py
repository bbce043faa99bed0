"""User-given text made safe to print: the one helper for every name pv-ray shows in a terminal.

Photo file names, folder names, ids that were refused, paths, and the reasons and error
messages that quote them come from whoever wrote the input. Printed through rich as they are, a
name like `[bold red]x[/].jpg` or `[link=https://…]` would be rendered as markup, and one holding
ESC, a carriage return or a bidirectional override would move the cursor, recolour the terminal
or rewrite what is shown. `terminal_safe` shows them literally: control characters become visible
escapes as Python writes them (`\\x1b`, `\\r`, `\\u202e`), and rich markup is escaped. (Emoji
codes such as `:smile:` are left to the console: pv-ray's is created with `emoji=False`.)
"""

from __future__ import annotations

import re

from rich.markup import escape

# C0 and C1 controls, DEL, line/paragraph separators, bidirectional marks, overrides and isolates,
# and lone surrogates (undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def terminal_safe(text: object) -> str:
    """`text` (any object, as `str()` shows it) to print through rich, shown literally."""
    return escape(_UNSAFE.sub(_visible, str(text)))
