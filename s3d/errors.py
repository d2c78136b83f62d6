"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class S3DError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option).

    The message must be one line and name the file or option at fault; the CLI prints it
    without a traceback.
    """


def one_line(message: object) -> str:
    """`message` as one printable line: control characters (a newline in a file name, say) are shown
    escaped, as Python writes them, instead of splitting the message or moving the cursor."""
    text = str(message)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
