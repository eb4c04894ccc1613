"""What every command line does with a failure: one line naming the file and the problem, exit status 2.

Failures a user can cause and fix (a missing or damaged file, a value out of range, a generation that went
non-finite) are the project's `errors.UserError`, raised at the boundary with a message that says what and where, or
an `OSError` from the file system (a missing file, a full disk, a permission); `command` turns them into
`PROG: error: MESSAGE` on stderr (argparse's format, on one line) and status 2. Anything else, a `ValueError` from
a library included, is a bug and keeps its traceback. Argument errors stay argparse's own (usage, then one line, status 2).
A message may quote what a file holds or how it is named, so the line is bounded in length and its control
characters escaped (`printable`): a hostile checkpoint cannot flood or drive the terminal.
"""
from __future__ import annotations

import functools
import os
import sys

from amskv_jax.errors import UserError

USER_ERRORS = (UserError, OSError)
MAX_MESSAGE = 1000  # characters of an error line's message


def command(prog: str):
    """Decorate a `main(argv) -> int`: a user error becomes one line on stderr and the return value 2."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except USER_ERRORS as err:
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
                return 2

        return run

    return wrap


def add_verify_flag(parser) -> None:
    """`--no-verify` (args.verify False; default None: verify unless AMSKV_SKIP_VERIFY is set)."""
    parser.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                        help="skip the checkpoint's array checksums (also: AMSKV_SKIP_VERIFY=1; file sizes are still "
                        "checked)")


def one_line(err: BaseException) -> str:
    """The error's message with its line breaks and runs of spaces folded into single spaces, then `printable`."""
    return printable(" ".join(str(err).split()) or type(err).__name__, MAX_MESSAGE)


def printable(value, limit: int) -> str:
    """`value` (text, bytes or a path) as text safe for one terminal line: control, non-printable and undecodable
    characters escaped (an ANSI escape shows as `\\x1b[31m`, a non-UTF-8 byte of a file name as `\\udcff`), cut to
    `limit` characters."""
    text = os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 1] + "…"
