"""User-facing errors: one clear message naming the culprit (architecture.md, item 9)."""


class LessegError(Exception):
    """Base class of errors that the CLI prints as one line, without a traceback."""


class ConfigError(LessegError):
    """An unknown key, a wrongly typed value or an inconsistent setting in a config."""


class DataError(LessegError):
    """A missing, unreadable or invalid data file (image, mask, split list)."""


class Paused(LessegError):
    """Training stopped on purpose and is resumable: it waits for something from outside (a person's labels
    of a round's regions). The CLI says how to go on, prints ``{"paused": message}`` and exits with status 3
    (``PAUSED_EXIT``); under torchrun with 0, since torchrun reports a worker's non-zero exit as a failure."""


PAUSED_EXIT = 3
