"""Periodic adapter diagnostics: a plain-loop helper and a transformers ``Trainer`` callback."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..diagnostics import Report, adapter_report, snapshot

__all__ = ["AdapterMonitor", "AdapterDiagnosticsCallback"]


class AdapterMonitor:
    """Every ``every`` optimizer steps, build :func:`~stiefel_opt.diagnostics.adapter_report`
    (stable rank of each ΔW, worst ‖XᵀX − I‖_F of its Stiefel factors, ‖ΔW − ΔW_prev‖_F since
    the previous report) and hand it to ``log(step, report)``; reports are kept in ``history``.

    Plain loop: call ``monitor.step()`` after each ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, every: int = 50, log: Callable[[int, Report], None] | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"AdapterMonitor: every must be a positive int, got {every!r}")
        self.model = model
        self.every = every
        self.log = log
        self.history: list[tuple[int, Report]] = []
        self.steps = 0
        self._previous = snapshot(model)
        if not self._previous:
            raise ValueError(f"AdapterMonitor: {type(model).__name__} has no adapter layers")

    def step(self, step: int | None = None) -> Report | None:
        """Count one optimizer step (or set the count to ``step``); report when it is a multiple
        of ``every``. Returns the report or None."""
        self.steps = self.steps + 1 if step is None else int(step)
        if self.steps % self.every:
            return None
        report = adapter_report(self.model, self._previous)
        self._previous = snapshot(self.model)
        self.history.append((self.steps, report))
        if self.log is not None:
            self.log(self.steps, report)
        return report


def _callback_class():
    from transformers import TrainerCallback

    class AdapterDiagnosticsCallback(TrainerCallback):
        """``Trainer`` callback running an :class:`AdapterMonitor` on the trained model after
        every optimizer step (``state.global_step``). Each report's summary (mean stable rank,
        worst feasibility, mean update norm), prefixed ``adapters/``, is appended with its step to
        ``state.log_history``; full reports are in ``callback.history`` and go to ``log``."""

        def __init__(self, every: int = 50, log: Callable[[int, Report], None] | None = None):
            if not isinstance(every, int) or every < 1:
                raise ValueError(f"AdapterDiagnosticsCallback: every must be a positive int, got {every!r}")
            self.every, self.log = every, log
            self.monitor: AdapterMonitor | None = None

        @property
        def history(self) -> list[tuple[int, Report]]:
            """The monitor's (step, report) pairs so far; empty before ``on_train_begin``."""
            return [] if self.monitor is None else self.monitor.history

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.monitor = AdapterMonitor(model, self.every, self.log)

        def on_step_end(self, args, state, control, **kwargs):
            report = self.monitor.step(state.global_step)
            if report is not None:
                summary = {f"adapters/{k}": v for k, v in report.summary().items()}
                state.log_history.append({**summary, "step": state.global_step})

    return AdapterDiagnosticsCallback


def __getattr__(name):
    if name == "AdapterDiagnosticsCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
