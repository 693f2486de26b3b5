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
