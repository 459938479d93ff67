"""The one error type mmflow raises for bad input (a leaf module)."""

from __future__ import annotations


class MmflowError(ValueError):
    """A clear, user-facing error that names what is wrong (file, line, id or parameter) and how to fix it."""
