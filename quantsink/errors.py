"""Errors the user can fix. The CLI prints them as one line and exits with status 2;
anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input: the message names the cause and the fix."""


class ModelLoadError(UserError):
    """A model spec that cannot be resolved or loaded (unknown, offline, corrupt)."""


class CalibrationDataError(UserError):
    """Calibration data that is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A quantsink output folder that is missing files or holds the wrong tensors."""
