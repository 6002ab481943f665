"""The project's error hierarchy: every user-facing failure is one of these, with one clear line."""


class AdaptersError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""

    exit_code = 1


class DataError(AdaptersError):
    """A training dataset is missing, malformed or unusable."""

    exit_code = 2


class BaseModelError(AdaptersError):
    """A base model cannot be found, converted or loaded."""

    exit_code = 3


class TrainingError(AdaptersError):
    """Training cannot start or cannot finish."""

    exit_code = 4


class TrainingInterrupted(AdaptersError):
    """Training stopped on a signal after saving a checkpoint it can resume from."""

    exit_code = 130
