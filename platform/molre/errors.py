"""molre's own error types. Every error says which item (file, key, preset) failed and why."""


class MolreError(Exception):
    """Base class: anything molre raises on purpose."""


class ConfigError(MolreError, ValueError):
    """A run or search-space config is invalid; the message names the dotted key."""


class ModelError(MolreError, ValueError):
    """A model cannot be built or cannot take the given input; the message says what was expected."""


class WeightsError(MolreError, ValueError):
    """A checkpoint does not fit the architecture (missing / unexpected / mis-shaped keys) or cannot be read."""


class DataError(MolreError, ValueError):
    """An input item (DICOM series, NIfTI, label file, shard) is unusable; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        """Pickled by its two arguments: it crosses process boundaries (Ray tasks and workers)."""
        return (type(self), (self.path, self.reason))
