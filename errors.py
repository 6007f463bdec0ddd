"""The one kind of error nanozh shows a user: a single line naming the file (and line or field),
what is wrong and what to do. Scripts catch NanozhError in main() and print it without a traceback;
anything else that escapes is a bug in nanozh itself."""

import re
import sys
from typing import NoReturn


class NanozhError(Exception):
    pass


def user_error(where: str, what: str, fix: str = "", line: int | None = None) -> NanozhError:
    """Build the error `nanozh: <where>[:<line>]: <what> (<fix>)`; the caller raises it. Always one
    line: a message quoted from a library (pyarrow's span several lines) has its line breaks folded."""
    loc = f"{where}:{line}" if line is not None else str(where)
    text = f"nanozh: {loc}: {what}" + (f" ({fix})" if fix else "")
    return NanozhError(re.sub(r"\s*[\r\n]+\s*", " ", text))


def exit_on_user_error(err: NanozhError) -> NoReturn:
    print(str(err), file=sys.stderr)
    sys.exit(1)
