"""The one error every checkpoint reader and writer raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted, loaded or resumed; the message names the file, tensor or value.
    A ValueError, so callers that catch bad input as ValueError keep working."""
