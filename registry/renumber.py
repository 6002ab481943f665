"""Renumbering on pull: a local, unpushed tag the remote took first gets a free name, so no version is lost."""

from __future__ import annotations

from adapterctl.registry.git import Git, NewTag, Tag
from adapterctl.registry.names import version_ref
from adapterctl.registry.refs import ASSIGN_TAG, REGISTER_TAG, State, tag_adapter, unassignments
from adapterctl.registry.repo import Registry


def renumber(git: Git, tag: Tag, state: State) -> Tag:
    """A free name for a local, unpushed tag that clashes with the remote's, so no version is lost (no ref yet)."""
    adapter = state.adapter(tag_adapter(tag.name))
    register = REGISTER_TAG.fullmatch(tag.name)
    if register:
        new = version_ref(adapter.name, adapter.latest.version.bump("patch"))
        message = f"{tag.message} (renumbered from {register['version']}: the remote registered it first)"
    else:
        match = ASSIGN_TAG.fullmatch(tag.name)
        cancel = "!" if match["cancel"] else ""
        new = f"{adapter.name}#{match['stage']}{cancel}#{adapter.last_counter + 1}"
        message = tag.message
    return _written(git, NewTag(new, tag.commit, message, max(tag.date, adapter.last_date + 1)))


def unassign_displaced(registry: Registry, kept: list[Tag], made: list[Tag]) -> list[Tag]:
    """Unassign the remote's holder of each stage a renumbered local assignment took over: GTO shows one holder too."""
    touched = sorted({(m["name"], m["stage"]) for t in made if (m := ASSIGN_TAG.fullmatch(t.name)) and not m["cancel"]})
    unassigned: list[Tag] = []
    for name, stage in touched:
        adapter = registry.state([*kept, *made, *unassigned]).adapters.get(name)
        head = adapter.stages().get(stage) if adapter else None
        if head:
            why = f"{head.ref} was assigned {stage} here while the remote assigned this one"
            new = unassignments(adapter, stage, head.version, why, adapter.last_date + 1)
            unassigned += [_written(registry.git, t) for t in new]
    return unassigned


def _written(git: Git, tag: NewTag) -> Tag:
    """TAG's tag object, written without a ref."""
    return Tag(tag.name, tag.commit, tag.date, "", "", tag.message, git.tag_object(tag))
