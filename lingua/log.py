"""Logging setup for lingua's entry points. It configures the `lingua` logger (and so its children) only, never the
root logger: a researcher who calls `lingua.train.loop.train` from code that set up its own logging keeps it, and lingua's
lines go through their handlers."""

import logging
import sys

logger = logging.getLogger("lingua")


def setup_logging(rank: int = 0, level: int | None = None) -> None:
    """INFO on rank 0 and WARNING elsewhere (or `level`). When nothing configured logging (the root logger has no
    handler, as in a plain command-line run) lingua's lines go to stdout, with `[rank]` on ranks other than 0; calling
    it again replaces that handler rather than adding a second one."""
    logger.setLevel(level if level is not None else logging.INFO if rank == 0 else logging.WARNING)
    for old in [h for h in logger.handlers if getattr(h, "lingua_console", False)]:
        logger.removeHandler(old)
    if logging.getLogger().handlers:
        return  # the application configured logging: our records propagate to its handlers
    fmt = f"%(asctime)s [{rank}] %(levelname)s %(message)s" if rank else "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.lingua_console = True
    logger.addHandler(handler)
