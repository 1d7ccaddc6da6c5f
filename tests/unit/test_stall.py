"""`instances.Stall`: a guest is called hung only after `hang_after` seconds in which nothing it shows changes.

The clock is the test's (no waiting); the machine is a stand-in whose signs of life the test sets. The real
proof, a panicked guest under QEMU, is tests/guest/test_boot_outputs.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from cos_customizer.executors.qemu import instances


@dataclass
class FakeInstance:
    name: str = "vm"


@dataclass
class FakeMachine:
    hang_after: float
    sign: tuple[int, ...] = (1, 10, 100)
    instance: FakeInstance = field(default_factory=FakeInstance)
    stopped: threading.Event = field(default_factory=threading.Event)
    looks: int = 0

    def signs_of_life(self) -> tuple[int, ...]:
        self.looks += 1
        return self.sign

    def console_tail(self) -> str:
        return "last | lines"

    def hang_report(self) -> str:
        return "vCPUs: 0 at ffffffff81000000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)  # the module `instances` reads it from
    return clock


def _watch(clock: Clock, machine: FakeMachine, seconds: float, changing: bool = False) -> None:
    """Advance the clock a second at a time for `seconds`, calling check() each time."""
    stall = instances.Stall(machine)  # type: ignore[arg-type]
    for step in range(int(seconds)):
        clock.now += 1.0
        if changing:
            machine.sign = (1, 10 + step, 100)
        stall.check()


def test_a_guest_showing_nothing_new_for_the_set_time_is_hung(clock: Clock) -> None:
    machine = FakeMachine(hang_after=30)
    with pytest.raises(instances.InstanceError) as raised:
        _watch(clock, machine, 60)
    assert str(raised.value) == (
        "instance vm: the guest made no progress for 30s (no serial output, no disk I/O): it hangs; "
        "the console's last lines: last | lines"
    )


def test_a_guest_just_under_the_set_time_is_not(clock: Clock) -> None:
    _watch(clock, FakeMachine(hang_after=30), 30)


def test_any_change_starts_the_count_again(clock: Clock) -> None:
    _watch(clock, FakeMachine(hang_after=5), 100, changing=True)


@pytest.mark.parametrize("hang_after", [0.0, -1.0])
def test_zero_turns_it_off(clock: Clock, hang_after: float) -> None:
    machine = FakeMachine(hang_after=hang_after)
    _watch(clock, machine, 1000)
    assert machine.looks == 0


def test_a_stopped_guest_is_not_hung(clock: Clock) -> None:
    machine = FakeMachine(hang_after=5)
    machine.stopped.set()
    _watch(clock, machine, 100)


def test_it_looks_once_a_second_at_most(clock: Clock) -> None:
    machine = FakeMachine(hang_after=100)
    stall = instances.Stall(machine)  # type: ignore[arg-type]
    for _ in range(50):
        clock.now += 0.1
        stall.check()
    assert machine.looks == 5
