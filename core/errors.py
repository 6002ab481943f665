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


class InvalidName(AdaptersError):
    """An adapter name, version, stage or reference is malformed."""

    exit_code = 2


class RegistryError(AdaptersError):
    """The adapter repository cannot do what was asked (not a repository, invalid adapter folder, ...)."""

    exit_code = 5


class DetachedHead(RegistryError):
    """HEAD names no branch, so there is nowhere to commit a version or merge a pull."""

    exit_code = 5


class NotFound(RegistryError):
    """An adapter, version, stage or remote does not exist."""

    exit_code = 6


class Conflict(RegistryError):
    """The request would rewrite history: an existing version, or a remote that moved on."""

    exit_code = 7


class IntegrityError(RegistryError):
    """Stored adapter files are missing or do not match their hashes."""

    exit_code = 8


class RemoteError(RegistryError):
    """A git or DVC remote cannot be reached or refused the transfer."""

    exit_code = 9


class AuthError(RemoteError):
    """No token to send to the Hugging Face Hub, or the Hub refused the one sent (401/403)."""

    exit_code = 10


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type when it says nothing), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
