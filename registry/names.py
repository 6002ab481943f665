"""Adapter names, versions, stages and references, checked before anything touches a path or a tag."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterctl.core.errors import InvalidName

# ASCII only, so look-alike letters, whitespace, '/', '.' and '..' can never reach a path or a tag;
# also inside what GTO and DVC accept as an artifact name.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?")
_STAGE = re.compile(r"[a-z](?:[a-z0-9_-]{0,30}[a-z0-9])?")
_VERSION = re.compile(r"v?(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})")
BUMPS = ("major", "minor", "patch")


def check_name(name: str) -> str:
    """Return NAME if it is a valid adapter name, else raise InvalidName saying what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(
            f"Adapter name {name!r} is not allowed; use 1-64 lowercase ASCII letters, digits, '_' or '-', "
            "starting and ending with a letter or digit."
        )
    return name


def check_stage(stage: str) -> str:
    """Return STAGE if it is a valid stage name (prod, staging, ...), else raise InvalidName."""
    if not _STAGE.fullmatch(stage):
        raise InvalidName(
            f"Stage {stage!r} is not allowed; use 1-32 lowercase ASCII letters, digits, '_' or '-', "
            "starting with a letter."
        )
    return stage


def check_message(message: str | None) -> str | None:
    """Return MESSAGE if it is one line of printable text (or None), else raise InvalidName."""
    if message is not None and (not message.isprintable() or not message.strip()):
        raise InvalidName("A message must be one non-empty line of printable text (no newlines or control characters).")
    return message.strip() if message is not None else None


@dataclass(frozen=True, order=True)
class Version:
    """A semantic version X.Y.Z; tags spell it vX.Y.Z."""

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse 'X.Y.Z' or 'vX.Y.Z'."""
        match = _VERSION.fullmatch(text.strip())
        if not match:
            raise InvalidName(f"Version {text!r} is not allowed; use X.Y.Z, for example 1.2.0.")
        return cls(*(int(part) for part in match.groups()))

    def fits(self) -> bool:
        """True when every part is within what a version may spell (six digits)."""
        return all(part <= 999999 for part in (self.major, self.minor, self.patch))

    def bump(self, part: str) -> Version:
        """The next version after this one for a major, minor or patch change."""
        if part == "major":
            return Version(self.major + 1, 0, 0)
        if part == "minor":
            return Version(self.major, self.minor + 1, 0)
        return Version(self.major, self.minor, self.patch + 1)

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}"


FIRST_VERSION = Version(1, 0, 0)


def version_ref(name: str, version: Version | str) -> str:
    """NAME@vX.Y.Z: how one immutable version is named everywhere (tags, responses, engine caches)."""
    return f"{name}@{version}"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: NAME, NAME@vX.Y.Z, NAME@latest or NAME#STAGE."""

    name: str
    version: Version | None = None
    stage: str | None = None
    latest: bool = False

    @classmethod
    def parse(cls, text: str) -> Ref:
        """Parse a reference as users type it."""
        if "#" in text:
            name, stage = text.split("#", 1)
            return cls(check_name(name), stage=check_stage(stage))
        if "@" in text:
            name, version = text.split("@", 1)
            if version == "latest":
                return cls(check_name(name), latest=True)
            return cls(check_name(name), version=Version.parse(version))
        return cls(check_name(text))

    def __str__(self) -> str:
        if self.stage:
            return f"{self.name}#{self.stage}"
        if self.version:
            return version_ref(self.name, self.version)
        return f"{self.name}@latest" if self.latest else self.name
