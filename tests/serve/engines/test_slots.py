"""The adapter slots of the transformers engine (one state machine per adapter version, the LRU, pinning) and
its admission policy.

The slots are bookkeeping over install/uninstall calls; here those calls are recorded instead of writing LoRA
layers (the engine tests run the same slots on a real model).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from adapterctl.serve.engines.transformers.admission import Admission
from adapterctl.serve.engines.base import AdapterLoadFailed, AdapterSpec, GenerateRequest, Sampling
from adapterctl.serve.engines.transformers.generation import Generation
from adapterctl.serve.engines.transformers.lora import AdapterWeights
from adapterctl.serve.engines.transformers.slots import Adapter, IllegalTransition, Slots, State

R, P, L, U, X, G = State.READING, State.PENDING, State.LOADED, State.UNLOADING, State.REJECTED, State.GONE
LEGAL = {(R, P), (R, X), (P, L), (P, X), (P, G), (L, U), (L, G), (U, L), (U, G)}


class Layers:
    """What the slots did to the layers: slot -> the adapter installed there; FAIL names one whose install fails."""

    def __init__(self) -> None:
        self.slots: dict[int, str] = {}
        self.cleared: list[int] = []
        self.fail: str | None = None

    def install(self, weights: AdapterWeights, slot: int) -> None:
        assert slot not in self.slots, f"slot {slot} is taken by {self.slots.get(slot)}"
        if weights.key == self.fail:
            raise ValueError("the layers refused it")
        self.slots[slot] = weights.key

    def uninstall(self, modules: tuple[str, ...], slot: int) -> None:
        assert modules == ("q_proj",)
        self.slots.pop(slot, None)
        self.cleared.append(slot)


def spec(name: str) -> AdapterSpec:
    return AdapterSpec(name, "v1.0.0", Path(name))


def weights(name: str) -> AdapterWeights:
    return AdapterWeights(spec(name).key, 4, {"q_proj": (None, None)})  # type: ignore[dict-item]


@pytest.fixture
def layers() -> Layers:
    return Layers()


@pytest.fixture
def slots(layers: Layers) -> Slots:
    return Slots(2, layers.install, layers.uninstall)


def loaded(slots: Slots, *names: str) -> None:
    """Read and install NAMES, in order."""
    for name in names:
        adapter = slots.request(spec(name))
        slots.read(adapter, weights(name))
        assert slots.place(adapter)


@pytest.mark.parametrize("start", list(State))
@pytest.mark.parametrize("end", list(State))
def test_only_the_moves_of_an_adapters_life_are_allowed(start: State, end: State) -> None:
    adapter = Adapter(spec("a"), state=start)
    if (start, end) in LEGAL:
        adapter.move(end)
        assert adapter.state is end
    else:
        with pytest.raises(IllegalTransition, match=f"adapter a@v1.0.0 cannot go from {start.value} to {end.value}"):
            adapter.move(end)
        assert adapter.state is start


def test_an_adapter_is_read_installed_unloaded_and_forgotten(slots: Slots, layers: Layers) -> None:
    adapter = slots.request(spec("a"))
    assert adapter.state is R and slots.request(spec("a")) is adapter and not adapter.settled
    slots.read(adapter, weights("a"))
    assert adapter.state is P and slots.loaded() == ()
    slots.sweep()  # a free slot: installed
    assert adapter.state is L and adapter.settled and adapter.weights is None  # the read weights are let go
    assert layers.slots == {0: "a@v1.0.0"} and slots.loaded() == ("a@v1.0.0",) and slots.loads == 1
    assert slots.unload("a@v1.0.0") is adapter and adapter.state is U and slots.loaded() == ("a@v1.0.0",)
    sweeps = slots.sweeps
    slots.sweep()
    assert adapter.state is G and layers.slots == {} and layers.cleared == [0] and slots.sweeps == sweeps + 1
    assert slots.get("a@v1.0.0") is None and slots.loaded() == ()
    again = slots.request(spec("a"))
    assert again is not adapter and again.state is R  # a new life, read afresh
    assert slots.unload("nobody@v1.0.0") is None and slots.unload("a@v1.0.0") is None  # not in a slot


def test_only_a_read_adapter_is_installed(slots: Slots) -> None:
    reading = slots.request(spec("a"))
    with pytest.raises(IllegalTransition, match="cannot be installed from reading"):
        slots.place(reading)
    loaded(slots, "b")
    with pytest.raises(IllegalTransition, match="cannot be installed from loaded"):
        slots.place(slots.get("b@v1.0.0"))  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition, match="cannot go from loaded to pending"):
        slots.read(slots.get("b@v1.0.0"), weights("b"))  # type: ignore[arg-type]


def test_the_least_recently_used_idle_adapter_makes_room_and_a_pinned_one_never_does(
    slots: Slots, layers: Layers
) -> None:
    loaded(slots, "a", "b")
    slots.touch(slots.get("a@v1.0.0"))  # type: ignore[arg-type]
    assert slots.loaded() == ("b@v1.0.0", "a@v1.0.0")
    loaded(slots, "c")  # b is the least recently used
    assert slots.loaded() == ("a@v1.0.0", "c@v1.0.0") and slots.evictions == 1 and set(layers.slots) == {0, 1}
    a, c = slots.pin(spec("a")), slots.pin(spec("c"))
    assert a is not None and c is not None and a.users == c.users == 1 and slots.busy() == 2
    assert slots.pin(spec("d")) is None  # it would need a slot of its own: none is free
    assert slots.pin(spec("a")) is a and a.users == 2  # a generation more on a pinned adapter needs no slot
    d = slots.request(spec("d"))
    slots.read(d, weights("d"))
    assert slots.place(d) is False and d.state is P  # every slot is pinned
    slots.sweep()
    assert d.state is P and d.settled  # tried: it waits, and a `load` may say so
    slots.unpin(c)
    slots.sweep()
    assert d.state is L and c.state is G and slots.loaded() == ("a@v1.0.0", "d@v1.0.0")
    assert slots.unload("a@v1.0.0") is None  # in use: not unloaded
    assert slots.loads == 4 and slots.evictions == 2


def test_an_unload_is_called_off_when_the_adapter_is_used_again(slots: Slots) -> None:
    loaded(slots, "a", "b")
    a = slots.unload("a@v1.0.0")
    assert a is not None and a.state is U
    slots.touch(a)  # a `load` came: it stays
    assert a.state is L
    slots.sweep()
    assert a.state is L and slots.loaded() == ("b@v1.0.0", "a@v1.0.0")
    b = slots.unload("b@v1.0.0")
    assert b is not None and slots.pin(spec("b")) is b  # a generation took it before the sweep
    slots.sweep()
    assert b.state is L and b.users == 1


def test_a_failed_install_rejects_the_adapter_and_frees_its_slot(slots: Slots, layers: Layers) -> None:
    layers.fail = "bad@v1.0.0"
    bad, good = slots.request(spec("bad")), slots.request(spec("good"))
    slots.read(bad, weights("bad"))
    slots.read(good, weights("good"))
    slots.sweep()
    assert bad.state is X and bad.settled and slots.get("bad@v1.0.0") is None
    assert isinstance(bad.error, AdapterLoadFailed)
    assert str(bad.error) == "bad@v1.0.0 cannot be served: installing it failed (ValueError)."
    assert layers.cleared == [0]  # no pass may read half an adapter
    assert good.state is L and layers.slots == {0: "good@v1.0.0"}  # the slot went to the next one
    unreadable = slots.request(spec("unreadable"))
    slots.reject(unreadable, AdapterLoadFailed(unreadable.key, "its files cannot be read"))
    assert unreadable.state is X and slots.get(unreadable.key) is None and unreadable.settled


def test_read_adapters_nobody_waits_for_are_dropped(slots: Slots) -> None:
    loaded(slots, "a", "b")
    a, b = slots.pin(spec("a")), slots.pin(spec("b"))
    assert a is not None and b is not None
    for name in ("c", "d", "e"):
        slots.read(slots.request(spec(name)), weights(name))
    e = slots.get("e@v1.0.0")
    slots.drop({"d@v1.0.0"})
    assert slots.get("c@v1.0.0") is None and e is not None and e.state is G and e.weights is None
    assert [x.key for x in slots.in_state(P)] == ["d@v1.0.0"]


def test_admission_takes_the_oldest_first_while_rows_are_free_and_their_adapters_have_a_slot(slots: Slots) -> None:
    def waiting(*names: str | None) -> deque[Generation]:
        return deque(
            Generation(GenerateRequest(f"r{i}", (1,), name and spec(name), Sampling(max_tokens=1)), loop=None)  # type: ignore[arg-type]
            for i, name in enumerate(names)
        )

    admission = Admission(slots, max_batch=4, capacity=1024, context_length=64)  # blocks to spare: rows decide
    queue = waiting("a", None, "b", "c", "a", None)
    queue[1].cancelled = True  # its client left while it waited
    admitted, new = admission.admit(queue, running=list(waiting(None)))  # three rows free
    assert [g.request.request_id for g in admitted] == ["r0", "r2", "r4"]  # c has no slot to go to: it waits
    assert [a.key for a in new] == ["a@v1.0.0", "b@v1.0.0"] and all(a.state is R for a in new)
    assert [g.request.request_id for g in queue] == ["r3", "r5"] and admitted[2].pinned is admitted[0].pinned
    assert new[0].users == 2 and new[1].users == 1 and slots.busy() == 2
    # One row free: the base row, behind c, which still waits.
    admitted, new = admission.admit(queue, running=list(waiting(None, None, None)))
    assert [g.request.request_id for g in admitted] == ["r5"] and new == [] and admitted[0].pinned is None


def test_pinned_adapters_may_fill_every_slot_while_idle_ones_stay_within_keep(layers: Layers) -> None:
    slots = Slots(4, layers.install, layers.uninstall, keep=2)
    loaded(slots, "a", "b")
    c = slots.request(spec("c"))
    slots.read(c, weights("c"))
    assert slots.place(c) and slots.get("a@v1.0.0") is None  # nobody uses it: at KEEP, the idle a makes room
    pinned = [slots.pin(spec(name)) for name in ("b", "c", "d", "e")]
    assert all(pinned) and slots.busy() == 4
    for adapter in pinned[2:]:
        slots.read(adapter, weights(adapter.key.split("@")[0]))  # type: ignore[union-attr]
        assert slots.place(adapter)  # type: ignore[arg-type]  # pinned: past KEEP, into the free slots
    assert len(slots.loaded()) == 4 and set(layers.slots) == {0, 1, 2, 3} and slots.pin(spec("f")) is None
    f = slots.request(spec("f"))
    slots.read(f, weights("f"))
    assert slots.place(f) is False  # a `load` alone: no idle adapter to make room
    for adapter in pinned[:3]:
        slots.unpin(adapter)  # type: ignore[arg-type]
    slots.trim()  # back to KEEP: the least recently used idle ones go
    assert slots.loaded() == ("d@v1.0.0", "e@v1.0.0") and len(layers.slots) == 2
    slots.sweep()
    assert f.state is L and slots.loaded() == ("e@v1.0.0", "f@v1.0.0")  # f took idle d's place
