"""The project's error type for failures a user causes and can fix.

`UserError` is raised at a boundary (a command-line value, a file, a model that does not fit a mesh, a generation
that went non-finite) with a message that says what and where. Command lines (`cli.command`) print it as one line
and exit 2; every other exception is a bug and keeps its traceback. It is a `ValueError`, so callers of the Python
API that catch `ValueError` keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A bad input or an unusable result, with a message that names it; see the module docstring."""
