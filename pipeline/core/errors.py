"""The errors every module raises, in a leaf module that imports nothing of the package.

``run_stage`` turns either into one line on stderr and exit status 2, no traceback.
"""


class ParamsError(ValueError):
    """params.yaml holds a key or value the pipeline cannot use."""


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""
