"""User-facing errors: the CLI prints them as one line and exits with their status (2 unless stated)."""


class MegamoeError(Exception):
    """A problem with the user's input (config, data file, checkpoint) or environment, not a bug."""

    exit_status = 2
    same_on_every_rank = False
    """Every rank of a distributed run raises it identically, so only rank 0 needs to print it."""


class ConfigError(MegamoeError):
    """A config key has a bad value, type or name; the message starts with the key."""

    same_on_every_rank = True

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def within(self, prefix: str) -> "ConfigError":
        """The same error with its key moved under prefix (a section name)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


class DataError(MegamoeError):
    """A data file or corpus cannot be read as configured."""


class CheckpointError(MegamoeError):
    """A checkpoint is missing, corrupt, or does not match the config."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are truncated, missing or unreadable (not merely incompatible)."""


class NonFiniteError(MegamoeError):
    """Training produced a non-finite loss, gradient or weight; the run stops (exit status 3)."""

    exit_status = 3
    same_on_every_rank = True
