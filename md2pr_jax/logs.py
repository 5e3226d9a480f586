"""Logging set-up shared by the command-line programs."""

import logging


class _QuietLibraries(logging.Filter):
    """Drops the INFO chatter of orbax (several lines per save) from the absl log."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    logging.getLogger("absl").addFilter(_QuietLibraries())
