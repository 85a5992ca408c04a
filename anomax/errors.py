"""One small exception family: every message says what was wrong, where, and what to do."""


class AnomaxError(Exception):
    """Base class of every error anomax raises on purpose."""


class DatasetError(AnomaxError):
    """A dataset folder, file, mask or split is missing, unreadable or inconsistent."""


class ConfigError(AnomaxError, ValueError):
    """An unknown name, key or an out-of-range parameter value."""


class WeightsError(AnomaxError):
    """Pretrained weights cannot be found, are unsafe, or do not fit the network."""


class ArtifactError(AnomaxError):
    """A saved model artifact is missing, corrupt, tampered with or incompatible."""


class InputError(AnomaxError, ValueError):
    """Arrays handed to a function have the wrong shape, dtype, or contain NaN."""


class OutputError(AnomaxError):
    """An output (run directory, artifact, metrics, pictures) cannot be written: disk full, permissions."""
