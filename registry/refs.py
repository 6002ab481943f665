"""Versions and stages read from git tags in GTO's grammar: NAME@vX.Y.Z registers, NAME#STAGE#N assigns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from core.errors import NotFound
from registry.git import Tag
from registry.names import Ref, Version, version_ref

REGISTER_TAG = re.compile(r"(?P<name>[a-z0-9][a-z0-9_-]*)@(?P<version>v\d+\.\d+\.\d+)")
ASSIGN_TAG = re.compile(r"(?P<name>[a-z0-9][a-z0-9_-]*)#(?P<stage>[a-z][a-z0-9_-]*)(?P<cancel>!?)#(?P<counter>\d+)")
ROLLBACK_PREFIX = "Roll back "


@dataclass(frozen=True)
class AdapterVersion:
    """One registered, immutable version of an adapter."""

    name: str
    version: Version
    commit: str
    tag: str
    date: int
    author: str
    message: str

    @property
    def ref(self) -> str:
        """NAME@vX.Y.Z."""
        return version_ref(self.name, self.version)


@dataclass(frozen=True)
class StageEvent:
    """A stage assignment or unassignment tag."""

    name: str
    stage: str
    version: Version
    commit: str
    tag: str
    date: int
    counter: int
    author: str
    message: str
    assign: bool

    @property
    def rollback(self) -> bool:
        """True for assignments written by `adapters rollback`."""
        return self.assign and self.message.startswith(ROLLBACK_PREFIX)


@dataclass
class Adapter:
    """All versions and stage events of one adapter name."""

    name: str
    versions: list[AdapterVersion] = field(default_factory=list)
    events: list[StageEvent] = field(default_factory=list)

    @property
    def latest(self) -> AdapterVersion:
        """The highest version."""
        return self.versions[-1]

    def version(self, version: Version) -> AdapterVersion | None:
        """That version, if registered."""
        return next((v for v in self.versions if v.version == version), None)

    def stages(self) -> dict[str, AdapterVersion]:
        """Each stage's current version: the most recently activated assignment still active."""
        active: dict[tuple[str, Version], int] = {}
        for position, event in enumerate(self.events):
            if event.assign:
                active[(event.stage, event.version)] = position
            else:
                active.pop((event.stage, event.version), None)
        heads: dict[str, tuple[int, Version]] = {}
        for (stage, version), position in active.items():
            if stage not in heads or position > heads[stage][0]:
                heads[stage] = (position, version)
        return {stage: self.version(v) for stage, (_, v) in sorted(heads.items()) if self.version(v)}

    def history(self, stage: str) -> list[Version]:
        """The versions that held STAGE, oldest first, with rolled-back ones popped off."""
        stack: list[Version] = []
        for event in self.events:
            if event.stage != stage or not event.assign:
                continue
            if event.rollback and stack:
                stack.pop()
            if not stack or stack[-1] != event.version:
                stack.append(event.version)
        return stack

    def stages_of(self, version: Version) -> list[str]:
        """Stages VERSION holds now."""
        return [stage for stage, held in self.stages().items() if held.version == version]

    @property
    def last_date(self) -> int:
        """The date of this adapter's newest tag."""
        dates = [v.date for v in self.versions] + [e.date for e in self.events]
        return max(dates, default=0)

    @property
    def last_counter(self) -> int:
        """The highest stage-event counter, as GTO numbers them."""
        return max((e.counter for e in self.events), default=0)


def is_registry_tag(name: str) -> bool:
    """True for tags that register a version or assign or unassign a stage."""
    return bool(REGISTER_TAG.fullmatch(name) or ASSIGN_TAG.fullmatch(name))


class State:
    """The registry as its tags describe it."""

    def __init__(self, tags: list[Tag]) -> None:
        self.tags = [t for t in tags if is_registry_tag(t.name)]
        """The version and stage tags it was read from."""
        self.adapters: dict[str, Adapter] = {}
        by_commit: dict[tuple[str, str], Version] = {}
        for tag in tags:
            match = REGISTER_TAG.fullmatch(tag.name)
            if match:
                version = Version.parse(match["version"])
                adapter = self.adapters.setdefault(match["name"], Adapter(match["name"]))
                adapter.versions.append(
                    AdapterVersion(match["name"], version, tag.commit, tag.name, tag.date, tag.author, tag.message)
                )
                by_commit[(match["name"], tag.commit)] = version
        for tag in tags:
            match = ASSIGN_TAG.fullmatch(tag.name)
            if not match or (match["name"], tag.commit) not in by_commit:
                continue
            self.adapters[match["name"]].events.append(
                StageEvent(
                    match["name"],
                    match["stage"],
                    by_commit[(match["name"], tag.commit)],
                    tag.commit,
                    tag.name,
                    tag.date,
                    int(match["counter"]),
                    tag.author,
                    tag.message,
                    not match["cancel"],
                )
            )
        for adapter in self.adapters.values():
            adapter.versions.sort(key=lambda v: v.version)
            adapter.events.sort(key=lambda e: (e.date, e.counter))
        self.adapters = dict(sorted(self.adapters.items()))

    def adapter(self, name: str) -> Adapter:
        """The adapter called NAME; NotFound if it has no versions."""
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none yet"
            raise NotFound(f"No adapter named {name!r} in this registry (known: {known}).")
        return self.adapters[name]

    def resolve(self, ref: Ref | str) -> AdapterVersion:
        """The version a reference means; a bare name is its prod version if assigned, else the latest."""
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        adapter = self.adapter(ref.name)
        if ref.version:
            found = adapter.version(ref.version)
            if not found:
                versions = ", ".join(str(v.version) for v in adapter.versions)
                raise NotFound(f"{ref} is not registered; {ref.name} has {versions}.")
            return found
        stages = adapter.stages()
        if ref.stage:
            if ref.stage not in stages:
                raise NotFound(f"No version of {ref.name} holds stage {ref.stage!r}; promote one first.")
            return stages[ref.stage]
        if not ref.latest and "prod" in stages:
            return stages["prod"]
        return adapter.latest
