"""Exceptions a user can act on. The CLI turns each into one sentence on stderr."""


class MMRetrieveError(Exception):
    """Base class: a mistake in input, configuration or environment, not a bug."""


class UnknownNameError(MMRetrieveError, KeyError):
    """A name that no plugin registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RegistrationError(MMRetrieveError):
    """A plugin registered something invalid, or a name another plugin already owns."""


class PluginLoadError(MMRetrieveError):
    """A plugin failed to import or to register; raised only in strict mode."""


class BundleError(MMRetrieveError):
    """A model bundle folder is missing, incomplete, corrupt or of a newer format."""


class ConfigError(MMRetrieveError):
    """A configuration file or --set override that cannot be applied."""


class InputError(MMRetrieveError):
    """Input data (images, captions, texts) that cannot be used."""


class IndexDamagedError(InputError):
    """An index folder whose files are missing, truncated or overwritten; rebuilding it recovers.

    ``problem`` is what was found, without the remedy, so a caller that knows more (the index
    folder around a damaged vector folder) can say it again in its own sentence.
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class ExportError(MMRetrieveError):
    """An export that cannot be written: bad options, an unusable target, a recall drop."""


class ParityError(ExportError):
    """An ONNX graph computes something other than the PyTorch model or head it came from."""
