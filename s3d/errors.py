"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class S3DError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option).

    The message must be one line and name the file or option at fault; the CLI prints it
    without a traceback.
    """
