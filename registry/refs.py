"""Versions and stages read from git tags in GTO's grammar: NAME@vX.Y.Z registers, NAME#STAGE#N assigns."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from adapterctl.core.errors import InvalidName, NotFound
from adapterctl.registry.git import NewTag, Tag
from adapterctl.registry.names import Ref, Version, check_name, check_stage, version_ref

REGISTER_TAG = re.compile(r"(?P<name>[^@#!]+)@(?P<version>v[0-9.]+)(?P<cancel>!?)(?:#(?P<counter>\d+))?")
DEPRECATE_TAG = re.compile(r"(?P<name>[^@#!]+)@deprecated(?:#(?P<counter>\d+))?")
ASSIGN_TAG = re.compile(r"(?P<name>[^@#!]+)#(?P<stage>[^@#!]+)(?P<cancel>!?)(?:#(?P<counter>\d+))?")
# What a command did is written by the command as the last line of the tag's message, after a blank line;
# user messages are one printable line, so they can never forge it.
ACTION_TRAILER = "Adapters-Action: "
ACTIONS = ("register", "promote", "rollback", "unassign")


def with_action(message: str, action: str) -> str:
    """A tag message: the human line, then the machine-written action trailer."""
    return f"{message}\n\n{ACTION_TRAILER}{action}"


def split_action(message: str) -> tuple[str, str | None]:
    """(the human text, the recorded action or None) of a tag message."""
    head, sep, last = message.rpartition("\n\n")
    if sep and last.startswith(ACTION_TRAILER) and last[len(ACTION_TRAILER) :] in ACTIONS:
        return head.strip(), last[len(ACTION_TRAILER) :]
    return message, None


def tag_adapter(tag: str) -> str | None:
    """The adapter name a tag in the registry's grammar belongs to, else None."""
    match = REGISTER_TAG.fullmatch(tag) or DEPRECATE_TAG.fullmatch(tag) or ASSIGN_TAG.fullmatch(tag)
    return match["name"] if match else None


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
    action: str | None = None

    @property
    def rollback(self) -> bool:
        """True for assignments written by `adapters rollback` (read from the tag's action trailer)."""
        return self.assign and self.action == "rollback"


@dataclass
class Adapter:
    """All versions and stage events of one adapter name."""

    name: str
    versions: list[AdapterVersion] = field(default_factory=list)
    events: list[StageEvent] = field(default_factory=list)
    retired: list[Version] = field(default_factory=list)
    """Versions deregistered with `gto deprecate NAME VERSION`: hidden, but their numbers stay taken."""
    withdrawn: list[AdapterVersion] = field(default_factory=list)
    """The deregistered versions whose register tags are still here: hidden, but their tags (and files) travel."""
    deprecated_at: int | None = None

    @property
    def latest(self) -> AdapterVersion:
        """The highest version."""
        return self.versions[-1]

    def version(self, version: Version) -> AdapterVersion | None:
        """That version, if registered."""
        return next((v for v in self.versions if v.version == version), None)

    def _active(self) -> dict[tuple[str, Version], int]:
        """(stage, version) pairs whose newest event is an assignment, with its position: GTO's full view."""
        active: dict[tuple[str, Version], int] = {}
        for position, event in enumerate(self.events):
            if event.assign:
                active[(event.stage, event.version)] = position
            else:
                active.pop((event.stage, event.version), None)
        return active

    def stages(self) -> dict[str, AdapterVersion]:
        """Each stage's current version: the most recently activated assignment still active."""
        heads: dict[str, tuple[int, Version]] = {}
        for (stage, version), position in self._active().items():
            if stage not in heads or position > heads[stage][0]:
                heads[stage] = (position, version)
        return {stage: self.version(v) for stage, (_, v) in sorted(heads.items()) if self.version(v)}

    def holders(self, stage: str) -> list[AdapterVersion]:
        """Every version GTO's full view (`versions_per_stage=-1`) shows in STAGE; one, unless two clones raced."""
        return [v for (s, number), _ in self._active().items() if s == stage and (v := self.version(number))]

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
        dates = [v.date for v in self.versions] + [e.date for e in self.events] + [self.deprecated_at or 0]
        return max(dates, default=0)

    @property
    def taken(self) -> list[Version]:
        """Every version number with a tag, deregistered ones included, lowest first."""
        return sorted({*(v.version for v in self.versions), *self.retired})

    @property
    def last_counter(self) -> int:
        """The highest stage-event counter, as GTO numbers them."""
        return max((e.counter for e in self.events), default=0)


class _Register(NamedTuple):
    """A register tag (or, CANCEL, a deregistration) read from its name."""

    tag: Tag
    name: str
    version: Version
    cancel: bool


_OUTSIDE = "not in the registry's tag grammar"


def _versions(registers: list[_Register]) -> dict[str, Adapter]:
    """The adapters the live REGISTERS name, each with its versions (in tag order)."""
    adapters: dict[str, Adapter] = {}
    for r in registers:
        text, _ = split_action(r.tag.message)
        adapter = adapters.setdefault(r.name, Adapter(r.name))
        adapter.versions.append(
            AdapterVersion(r.name, r.version, r.tag.commit, r.tag.name, r.tag.date, r.tag.author, text)
        )
    return adapters


def _withdraw(adapters: dict[str, Adapter], cancels: list[_Register]) -> None:
    """Hide each version a deregistration of CANCELS names; its number stays taken and its tag travels."""
    for r in cancels:
        if r.name in adapters:
            adapter = adapters[r.name]
            adapter.retired.append(r.version)
            adapter.withdrawn += [v for v in adapter.versions if v.version == r.version]
            adapter.versions = [v for v in adapter.versions if v.version != r.version]


class State:
    """The registry as its tags describe it; tags outside the grammar, or for other artifacts, are skipped."""

    def __init__(self, tags: list[Tag], has_pointer: Callable[[list[Tag]], list[bool]] | None = None) -> None:
        self.skipped: dict[str, str] = {}
        """Tags that look like registry tags but were ignored, with why."""
        self.adapters: dict[str, Adapter] = {}
        self.deprecated: dict[str, Adapter] = {}
        """Adapters deprecated with `gto deprecate NAME`: hidden until a new version is registered."""
        registers, assigns, deprecations = self._parse(tags)
        live = self._with_pointer([r for r in registers if not r.cancel], has_pointer)
        adapters = _versions(live)
        _withdraw(adapters, [r for r in registers if r.cancel])
        self._add_events(adapters, {(r.name, r.tag.commit): r.version for r in live}, assigns)
        for tag, name in deprecations:
            if name in adapters:
                adapters[name].deprecated_at = max(tag.date, adapters[name].deprecated_at or 0)
        self.tags = [t for t in tags if t.name not in self.skipped and tag_adapter(t.name) in adapters]
        """The registry tags it was read from (deprecated adapters' included)."""
        self._file(adapters)

    def _parse(self, tags: list[Tag]) -> tuple[list[_Register], list[tuple[Tag, re.Match[str]]], list[tuple[Tag, str]]]:
        """TAGS sorted by kind (registers, stage assignments, deprecations); the rest of ours is skipped."""
        registers: list[_Register] = []
        assigns: list[tuple[Tag, re.Match[str]]] = []
        deprecations: list[tuple[Tag, str]] = []
        for tag in tags:
            match = REGISTER_TAG.fullmatch(tag.name)
            try:
                if match:
                    version = Version.parse(match["version"])
                    registers.append(_Register(tag, check_name(match["name"]), version, bool(match["cancel"])))
                elif match := DEPRECATE_TAG.fullmatch(tag.name):
                    deprecations.append((tag, check_name(match["name"])))
                elif match := ASSIGN_TAG.fullmatch(tag.name):
                    check_name(match["name"])
                    check_stage(match["stage"])
                    assigns.append((tag, match))
                elif "@" in tag.name or "#" in tag.name:
                    self.skipped[tag.name] = _OUTSIDE
            except InvalidName:
                self.skipped[tag.name] = _OUTSIDE
        return registers, assigns, deprecations

    def _with_pointer(
        self, live: list[_Register], has_pointer: Callable[[list[Tag]], list[bool]] | None
    ) -> list[_Register]:
        """The registers of LIVE whose commit holds the adapter (when HAS_POINTER can tell); the others skipped."""
        if not has_pointer:
            return live
        found = has_pointer([r.tag for r in live])
        for register, ok in zip(live, found, strict=True):
            if not ok:
                self.skipped[register.tag.name] = "its commit holds no adapter (another artifact, or files removed)"
        return [r for r, ok in zip(live, found, strict=True) if ok]

    def _add_events(
        self,
        adapters: dict[str, Adapter],
        by_commit: dict[tuple[str, str], Version],
        assigns: list[tuple[Tag, re.Match[str]]],
    ) -> None:
        """Each stage tag of ASSIGNS as an event of its adapter; one on a commit no version of it holds is skipped."""
        for tag, match in assigns:
            name = match["name"]
            if (name, tag.commit) not in by_commit:
                self.skipped[tag.name] = "assigns a stage to a commit with no registered adapter version"
                continue
            text, action = split_action(tag.message)
            adapters[name].events.append(
                StageEvent(
                    name,
                    match["stage"],
                    by_commit[(name, tag.commit)],
                    tag.commit,
                    tag.name,
                    tag.date,
                    int(match["counter"] or 0),
                    tag.author,
                    text,
                    not match["cancel"],
                    action,
                )
            )

    def _file(self, adapters: dict[str, Adapter]) -> None:
        """Put each of ADAPTERS, its versions and events in order, under adapters or deprecated."""
        for name, adapter in sorted(adapters.items()):
            adapter.versions.sort(key=lambda v: v.version)
            adapter.events.sort(key=lambda e: (e.date, e.counter))
            # As GTO reads it: deprecated while the deprecation is its newest event.
            newest = max([v.date for v in adapter.versions] + [e.date for e in adapter.events], default=None)
            if newest is None or (adapter.deprecated_at is not None and adapter.deprecated_at >= newest):
                self.deprecated[name] = adapter
            else:
                self.adapters[name] = adapter

    @property
    def every_version(self) -> list[AdapterVersion]:
        """Every version a register tag here names: deregistered ones and deprecated adapters' too (tags travel)."""
        adapters = [*self.adapters.values(), *self.deprecated.values()]
        return [v for a in adapters for v in [*a.versions, *a.withdrawn]]

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


def unassignments(adapter: Adapter, stage: str, keep: Version, why: str, date: int) -> list[NewTag]:
    """`NAME#STAGE!#N` tags for every holder of STAGE but KEEP, numbered on from the adapter's, dated from DATE."""
    displaced = [v for v in adapter.holders(stage) if v.version != keep]
    return [
        NewTag(
            f"{adapter.name}#{stage}!#{adapter.last_counter + i}",
            v.commit,
            with_action(f"Unassign {stage} from {v.ref} ({why})", "unassign"),
            date + i - 1,
        )
        for i, v in enumerate(displaced, 1)
    ]
