"""Progress you can see: one small helper for every long loop (training, sampling, evaluation).

On rank 0 only. When stderr is a terminal it is a tqdm bar (rate, ETA and the values passed to
:meth:`Progress.update`); otherwise (DVC, CI, a log file) it prints one plain line every
``every`` updates and at the end, so logs stay readable. ``diffusion --quiet``, ``--quiet`` on a
command or ``DIFFUSION_QUIET=1`` silences it::

    with Progress(total=1000, desc="train", unit="step") as bar:
        for step in range(1, 1001):
            ...
            bar.update(1, loss=0.03)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

QUIET_ENV = "DIFFUSION_QUIET"


def quiet() -> bool:
    """True when ``DIFFUSION_QUIET`` is set to a true value (``--quiet`` sets it)."""
    return os.environ.get(QUIET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _rank() -> int:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """A progress bar (TTY) or a plain line every ``every`` updates (no TTY); silent when quiet,
    on ranks other than 0 or with ``enabled=False``.

    Args:
        total: the count at the end (None when unknown).
        desc: what is counted, printed first (``train``, ``ddim50``).
        unit: the unit of the count (``step``, ``img``).
        every: lines in plain mode: one each ``every`` counted units (default: a tenth of total).
        leave: keep the bar on screen when done (TTY only).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        every: int | None = None,
        initial: int = 0,
        leave: bool = True,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._last_line = self._start_n = initial
        self.every = max(1, every if every is not None else (total or 10) // 10)
        self.enabled = enabled and not quiet() and _rank() == 0
        self.stream = stream if stream is not None else sys.stderr
        self.values: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._bar = None
        if self.enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                             dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **values: Any) -> None:
        """Count ``n`` more units; ``values`` (loss, lr, ...) are shown beside the count."""
        self.goto(self.n + n, **values)

    def goto(self, n: int, **values: Any) -> None:
        """Set the count to ``n`` (e.g. the step a resumed run logs first)."""
        step, self.n = n - self.n, n
        self.values.update(values)
        if not self.enabled:
            return
        if self._bar is not None:
            if values:
                self._bar.set_postfix({k: _format(v) for k, v in self.values.items()},
                                      refresh=False)
            self._bar.update(step)
        elif self.n - self._last_line >= self.every or self.n == self.total:
            self._line()

    def rate(self) -> float | None:
        """Units per second since the start (None before any)."""
        elapsed = time.perf_counter() - self._start
        done = self.n - self._start_n
        return done / elapsed if elapsed > 0 and done > 0 else None

    def _line(self) -> None:
        self._last_line = self.n
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        parts += [f"{k} {_format(v)}" for k, v in self.values.items()]
        rate = self.rate()
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        print(", ".join(parts), file=self.stream, flush=True)

    def callback(self) -> Callable[[dict], None]:
        """A sampler callback (``{i, t, x, x0_pred}``) that counts one step per call."""
        return lambda info: self.goto(int(info["i"]) + 1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._last_line:
            self._line()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
