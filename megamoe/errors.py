"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class MegamoeError(Exception):
    """A problem with the user's input (config, data file, checkpoint), not a bug."""


class ConfigError(MegamoeError):
    """A config key has a bad value, type or name; the message starts with the key."""

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
