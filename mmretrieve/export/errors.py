"""What can stop an export; each is a one-sentence MMRetrieveError the CLI prints as is."""

from ..errors import MMRetrieveError


class ExportError(MMRetrieveError):
    """An export that cannot be written: bad options, an unusable target, a recall drop."""


class ParityError(ExportError):
    """The ONNX graph computes something other than the PyTorch model it came from."""
