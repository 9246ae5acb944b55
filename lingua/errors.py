"""User-facing errors: one line that names the offending key, file or line, never a traceback."""

import importlib
import os
import sys


class LinguaError(Exception):
    """A mistake in the user's input (file, value, environment). Entry points print it on one line and exit 1."""

    exit_code = 1


class ConfigError(LinguaError):
    """A bad config key, type or file. Entry points print it on one line and exit 2."""

    exit_code = 2


def require(package: str, extra: str):
    """Import an optional package, or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise LinguaError(
            f"'{package}' is not installed ({e}); install it with: pip install -e '.[{extra}]'"
        ) from None


def print_error(e: LinguaError) -> int:
    """Print `e` as one line on stderr (prefixed with the rank on ranks other than 0); return its exit code. Every
    entry point ends a LinguaError this way."""
    rank = os.environ.get("RANK")
    who = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{who}error: {e}", file=sys.stderr, flush=True)
    return e.exit_code


def exit_on_error(main):
    """Decorate a command-line `main`: a LinguaError becomes one line on stderr and its exit code."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except LinguaError as e:
            sys.exit(print_error(e))

    wrapped.__name__, wrapped.__doc__ = main.__name__, main.__doc__
    return wrapped
