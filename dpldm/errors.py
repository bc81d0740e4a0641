"""The error classes every dpldm module raises for bad input, in one place.

    DpldmError                 base of every error dpldm raises on purpose
    └── InputError             the user's input is wrong (a config value, a file, a flag, a
        │                      privacy parameter, a checkpoint): `dpldm` and `launch/train.py`
        │                      print it as ONE line naming what and where, and exit 2
        ├── UserError          raised by command modules for anything else the user must fix
        ├── ConfigError        (dpldm.config)       ├── DataError (dpldm.data.errors)
        ├── CheckpointError    (dpldm.checkpoint)   ├── PrivacyParameterError (dpldm.privacy.accountant)
        ├── PlanError / LaunchError / ZeroConfigError (dpldm.parallel)
        ├── DeviceError        (dpldm.utils.device)
        └── RunFolderError     (another run holds the folder, resume on other data, ...)

Library modules import from here, never from `dpldm.cli` (the CLI imports the library, not
the reverse). Each concrete class keeps its historical builtin base too (ValueError,
RuntimeError), so `except ValueError` in user code keeps working.
"""
from __future__ import annotations


class DpldmError(Exception):
    """Base of every error dpldm raises on purpose (not a bug)."""


class InputError(DpldmError):
    """Bad input from the user: printed as one clear line, exit code 2, never a traceback."""


class UserError(InputError):
    """Bad input detected by a command module (a flag, a path, a combination of options)."""


class DeviceError(InputError, ValueError):
    """A device was asked for that does not exist here (`--device cuda` without a GPU, ...)."""


class RunFolderError(InputError, RuntimeError):
    """A run folder is in use by another process, holds another run, or cannot be written."""
