"""The one error type for user mistakes: the CLI prints it as a single line."""


class LatentgenError(Exception):
    """A problem with the user's input (file, argument, checkpoint), not a bug."""
