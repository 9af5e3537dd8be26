"""Failures a stage reports as one line and an exit code instead of a traceback."""

import signal


class StageError(RuntimeError):
    """A stage cannot do its job (missing input, unusable data); the CLI exits 1."""


class StageInterruptedError(Exception):
    """A stage stopped early on a signal; ``code`` is the shell's ``128 + signal number``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.code = 128 + signum
