"""Loss spikes (`--check-for-spiky-loss`): which step's loss is far above the recent ones.

Two rules over the losses of the last `--spike-window` applied steps (finite, not skipped):
- Megatron-LM's: more than `--spiky-loss-factor` (10) x the largest of them, an exponent gone
  wrong rather than a bad batch. It holds from the second step on.
- OLMo-core's stability monitor: more than `--spike-zscore-threshold` (6) standard deviations
  above their mean, once the window is full (128 steps by default, OLMo-core's too): the window
  spans the loss's own descent, so only a jump well past the step-to-step noise counts.

The loss judged is the global one the engine reads once per step (`Engine.step` hands it to
`SpikeGuard.judge` after its one host read and before the optimizer step): the same value on every
rank, so every rank takes the same decision without a collective, and the check costs a few
floating-point operations per step on the host. A resumed run starts with an empty window.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

from .engine import StepResult


class SpikeDetector:
    def __init__(self, factor: float = 10.0, zscore: float = 6.0, window: int = 128):
        """`zscore` 0 turns the z-score rule off."""
        self.factor, self.zscore = factor, zscore
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)  # (iteration, loss) of applied steps

    def check(self, loss: float) -> Optional[str]:
        """Why `loss` is a spike against the recent losses, or None when it is not."""
        if not self.recent:
            return None
        losses = [x for _, x in self.recent]
        largest = max(losses)
        if loss > self.factor * largest:
            return (f"loss {loss:.4g} is more than {self.factor:g}x the largest of the last {len(losses)} "
                    f"({largest:.4g})")
        if self.zscore and len(losses) == self.recent.maxlen:
            mean = sum(losses) / len(losses)
            std = math.sqrt(sum([(x - mean) ** 2 for x in losses]) / len(losses))
            # a flat window (std 0) has no scale to measure a jump in: the factor rule alone holds
            if std > 0 and (loss - mean) / std > self.zscore:
                return (f"loss {loss:.4g} is {(loss - mean) / std:.1f} standard deviations above the mean of the last "
                        f"{len(losses)} ({mean:.4g}, std {std:.3g}; threshold {self.zscore:g})")
        return None

    def record(self, iteration: int, loss: float) -> None:
        """An applied step's loss joins the window."""
        self.recent.append((iteration, loss))

    def forget_after(self, iteration: int) -> None:
        """Drop the losses of iterations after `iteration` (a rollback trains them again)."""
        while self.recent and self.recent[-1][0] > iteration:
            self.recent.pop()


class SpikeGuard:
    """The detector and `--spike-action`: `judge` for `Engine.step`, `seen` for the loop."""

    def __init__(self, detector: SpikeDetector, action: str):
        self.detector, self.action = detector, action
        self._spike: Optional[str] = None  # the judged step's reason, until `seen` reads it

    @classmethod
    def from_config(cls, cfg) -> Optional["SpikeGuard"]:
        t = cfg.train
        if not t.check_for_spiky_loss:
            return None
        return cls(SpikeDetector(t.spiky_loss_factor, t.spike_zscore_threshold, t.spike_window), t.spike_action)

    def judge(self, loss: float, grad_norm: float) -> Optional[str]:
        """Asked by `Engine.step` about a finite step before its update: a reason not to apply it
        (a spike, and the action is not `log`), or None to apply it."""
        reason = self.detector.check(loss)
        self._spike = f"a loss spike ({reason})" if reason else None
        return self._spike if self.action != "log" else None

    def seen(self, iteration: int, result: StepResult) -> Optional[str]:
        """After the step of `iteration`: the spike's description if it was one (None otherwise); an
        applied finite step's loss joins the window."""
        spike, self._spike = self._spike, None
        if not result.skipped and math.isfinite(result.loss):
            self.detector.record(iteration, result.loss)
        return spike
