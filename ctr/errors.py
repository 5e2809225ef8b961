"""One error path for every command (``train``, ``prepare``): a user's mistake is one line, a bug a traceback.

- :class:`UserError` (and its subclasses, e.g. :class:`ctr.data.raw.ParseError`) is a mistake in the command
  line, the config or the inputs. Its message names what is wrong and where (flag, gin binding, file, line,
  field or split). The command prints it as one line (:func:`one_line`) and exits :data:`EXIT_USER`.
- Anything else is unexpected: Python prints the traceback and the command exits 1.

Exit codes are listed in ``docs/ERRORS.md``.
"""
from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected error: traceback
EXIT_USER = 2  # a user error: one line
EXIT_DIVERGED = 3  # train: the loss became NaN or Inf
MAX_LINE = 400  # characters of one error line
_MAX_QUOTE = 60  # characters of a quoted input value


class UserError(Exception):
    """A mistake in the command line, the config or the inputs; the message names the flag, binding or file."""


class ConfigError(UserError, ValueError):
    """A gin binding or flag with a wrong type or value (found before any data is read)."""


def shorten(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text):,} characters)"
    return text[: max(limit - len(suffix), 0)] + suffix


def quote(value: bytes | str, limit: int = _MAX_QUOTE) -> str:
    """``repr(value)`` of an input value for an error line, cut to about ``limit`` characters (a field can be a
    16 KB block of NULs)."""
    shown = repr(value[:limit])
    if len(value) <= limit and len(shown) <= limit + 3:
        return shown
    return f"{shown[:limit]}... ({len(value):,} {'bytes' if isinstance(value, bytes) else 'characters'})"


def one_line(error: BaseException | str, limit: int = MAX_LINE) -> str:
    """The message of ``error`` as one line of at most ``limit`` characters.

    gin's messages span lines (the binding, its location and a caret line) and gin appends "In call to
    configurable ..." to errors raised inside a configurable; the lines are joined and the caret and the call
    note dropped, so the line still names the binding and its file.
    """
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [l for l in lines if l and set(l) != {"^"} and not l.startswith("In call to configurable")]
    if len(kept) > 1:
        kept = [l[:-1] if l.endswith(".") else l for l in kept]
    return shorten("; ".join(kept) or type(error).__name__, limit)


def report(command: str, error: BaseException | str, kind: str = "error") -> int:
    """Prints ``<command>: <kind>: <one line>`` to stderr; returns :data:`EXIT_USER`."""
    print(f"{command}: {kind}: {one_line(error)}", file=sys.stderr, flush=True)
    return EXIT_USER


def check_int(binding: str, value, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; else a :class:`ConfigError` naming ``binding``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{binding}: expected an integer, got {shorten(repr(value), 80)} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{binding}: must be >= {minimum}, got {value}")
    return value
