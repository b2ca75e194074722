"""One exception type for user mistakes: the CLI prints its message and exits without a traceback."""


class SynthpertError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). The message names it."""
