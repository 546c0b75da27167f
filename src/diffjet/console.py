"""What the `diffjet` command shows on a terminal: quiet by default, everything with `-v`.

By default the known-harmless lines of the libraries below are left out (transformers' notice that
torchvision is not installed, diffusers' empty list of float32 modules on every cast), a truncated
prompt is echoed in one line instead of in full, and a Python warning is one line without the source
line it came from. `-v` shows all of it, and diffjet's own INFO log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

#: Substrings of third-party log lines that say nothing a diffjet user can act on.
HARMLESS = (
    "requires torchvision (not installed)",  # transformers 5, when diffusers looks up CLIP's image processor
    "that should be kept in float32: []",  # diffusers, on every `.to(dtype)` of a model with no such module
)
#: diffusers' warning about a prompt longer than CLIP's 77 tokens; the rest of it is the removed text.
TRUNCATED = "The following part of your input was truncated"
#: How much of the removed text a quiet terminal shows.
TRUNCATED_SHOWN = 60


class QuietFilter(logging.Filter):
    """Drops the `HARMLESS` lines and shortens the echo of a truncated prompt to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in HARMLESS):
            return False
        if message.startswith(TRUNCATED):
            head, _, removed = message.partition(": ")
            shown = " ".join(removed.split())[:TRUNCATED_SHOWN]
            record.msg, record.args = f"{head}: {shown}... ({len(removed)} characters; -v shows them)", ()
        return True


def _handlers() -> list[logging.Handler]:
    """The handlers that print third-party lines: the root logger's, and diffusers' and transformers' own
    (each library prints through a handler on its root logger and does not propagate)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.get_verbosity()  # both configure their handler on first use
    transformers.utils.logging.get_verbosity()
    loggers = (logging.getLogger(), logging.getLogger("diffusers"), logging.getLogger("transformers"))
    return [handler for logger in loggers for handler in logger.handlers]


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    print(text if text.startswith("diffjet:") else f"{category.__name__}: {text}", file=file or sys.stderr)


@contextlib.contextmanager
def terminal(verbose: bool) -> Iterator[None]:
    """Set up logging and warnings for one command (see the module docstring), and undo it after."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    diffjet_logger = logging.getLogger("diffjet")
    level = diffjet_logger.level
    diffjet_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    handlers = [] if verbose else _handlers()
    quiet = QuietFilter()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.showwarning = _one_line
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
        diffjet_logger.setLevel(level)
