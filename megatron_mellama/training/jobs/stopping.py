"""Stopping: too many skipped iterations end the run as a failure; signals and exit limits stop it.

The decision is a collective (`RunControl.should_stop`), taken at every iteration on every rank."""

from __future__ import annotations

from ..run_control import RunControl, TrainingStopped
from ..run_state import RunState


class Stopping:
    def __init__(self, control: RunControl):
        self.control = control

    def due(self, state: RunState) -> bool:
        return True

    def run(self, state: RunState) -> None:
        control = self.control
        too_many = control.too_many_skipped() or (state.at_end and control.ended_inside_skipped_steps())
        if too_many:
            raise TrainingStopped(too_many)
        state.stop = control.should_stop(state.iteration)
