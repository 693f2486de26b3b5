"""User-facing errors.

Anything a user can cause (a missing file, a count mismatch, a NaN pixel) is raised as
:class:`DistdrgnError` with a one-line message that names the file and what is wrong.
The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
"""


class DistdrgnError(Exception):
    """An error caused by the user's input or environment, reported in one line."""


class FormatError(DistdrgnError):
    """A file that cannot be parsed, or whose contents contradict each other."""


class StoreError(DistdrgnError):
    """A particle store that is missing, incomplete, corrupt or inconsistent."""


class Stopped(DistdrgnError):
    """A run stopped on a signal after writing a checkpoint (:mod:`distdrgn.preemption`);
    ``exit_code`` is 128 + the signal number, as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int | None):
        super().__init__(message)
        self.exit_code = 128 + (signum or 15)  # 15 = SIGTERM when only another rank saw the signal
