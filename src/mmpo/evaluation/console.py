"""Evaluation's console: log lines through rich on stderr, never read as markup; quiet HTTP clients."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]

_QUIET = ("httpx", "httpx2", "httpcore", "openai", "anthropic", "urllib3", "filelock")


def configure_logging(level: int = logging.INFO) -> None:
    """Show ``mmpo``'s INFO lines (row ids, paths and judge names printed as they are, not as markup).

    Leaves logging alone when the application already configured it (a handler on the root or
    ``mmpo`` logger); always keeps the HTTP clients' per-request INFO lines out.
    """
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logger = logging.getLogger("mmpo")
    if logger.handlers or logging.getLogger().handlers:
        return
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), markup=False, show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
