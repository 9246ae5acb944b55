"""User-facing errors: one line that names the offending key, file or line, never a traceback."""


class LinguaError(Exception):
    """A mistake in the user's input (file, value, environment). Entry points print it on one line and exit 1."""

    exit_code = 1


class ConfigError(LinguaError):
    """A bad config key, type or file. Entry points print it on one line and exit 2."""

    exit_code = 2


def exit_on_error(main) -> None:
    """A script's `if __name__ == "__main__":` body: run main(); a LinguaError becomes one line and its exit code."""
    import sys

    try:
        main()
    except LinguaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def require(package: str, extra: str):
    """Import an optional package, or fail with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise LinguaError(
            f"'{package}' is not installed ({e}); install it with: pip install -e '.[{extra}]'"
        ) from None
