"""Libraries' warnings and log records as one `s3d: warning:` line each, for users of the `s3d` command.

`library_messages()` is installed by the CLI's `main` only: the library never filters warnings, so Python
users keep theirs as their settings say. Worker processes that start fresh (spawn: `s3d evaluate -j`, or
DataLoader workers where spawn is the default) do not inherit it; their initialiser calls
`install_in_worker(active())`, evaluated in the parent, so that they show messages the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from s3d.errors import one_line

# Libraries whose warnings and log messages a user of the CLI sees as one `s3d: warning:` line each.
LIBRARIES = ("nibabel", "huggingface_hub")
# nibabel logs header fixes ("sform_code 7 not valid; setting to 0") on this logger, through a handler
# it adds when imported; a logger filter applies whenever that happens
_NIBABEL_LOGGER = "nibabel.global"

_active: _LibraryMessages | None = None


class _LibraryMessages:
    """nibabel's and huggingface_hub's warnings and log records, each distinct one shown once on one line
    naming the file s3d was reading, instead of a multi-line warning (or a bare log line printed three
    times, once per header read) that names neither the file nor the program."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.default_showwarning = warnings.showwarning

    def show(self, library: str, message: str) -> None:
        io = sys.modules.get("s3d.data.io")  # not imported: s3d is reading no image
        where = io.current_file() if io is not None else None
        text = one_line(" ".join(message.split()))
        line = f"s3d: warning: {where + ': ' if where and where not in text else ''}{text} ({library})"
        if line in self.seen:
            return
        self.seen.add(line)
        from tqdm.auto import tqdm  # above a progress bar, not through it

        # One write of the whole line: a spawned worker's stderr is unbuffered, and tqdm.write's separate
        # write of the newline let two workers' lines run into one (`s3d evaluate -j 2`, seen in CI).
        # A pipe write this short is atomic (POSIX PIPE_BUF, >= 512 bytes; 4096 on Linux).
        tqdm.write(line + "\n", file=sys.stderr, end="")

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        library = next((lib for lib in LIBRARIES if f"{os.sep}{lib}{os.sep}" in str(filename)
                        or (category.__module__ or "").split(".")[0] == lib), None)
        if library is None:
            self.default_showwarning(message, category, filename, lineno, file, line)
        else:
            self.show(library, str(message))

    def filter(self, record: logging.LogRecord) -> bool:
        """A filter on nibabel's logger: show the record our way; False keeps nibabel's own handler quiet."""
        self.show(record.name.split(".")[0], record.getMessage())
        return False


def active() -> bool:
    """Whether this process shows library messages the s3d way (inside `library_messages()`)."""
    return _active is not None


@contextlib.contextmanager
def library_messages() -> Iterator[None]:
    """Within the block, library warnings and nibabel's log records are shown as `s3d: warning:` lines, and
    huggingface_hub's retry logs are quiet (s3d turns a failed download into an error that says what to
    do; HF_HUB_VERBOSITY set by the user wins)."""
    global _active
    messages = _LibraryMessages()
    nib_logger = logging.getLogger(_NIBABEL_LOGGER)
    hf_logger = logging.getLogger("huggingface_hub")
    hf_level, hf_quiet = hf_logger.level, "HF_HUB_VERBOSITY" not in os.environ
    if hf_quiet:
        os.environ["HF_HUB_VERBOSITY"] = "error"  # read when huggingface_hub is imported
        hf_logger.setLevel(logging.ERROR)  # already imported (a test, an embedding program)
    nib_logger.addFilter(messages)
    previous, _active = _active, messages
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters afterwards
            warnings.showwarning = messages.showwarning
            yield
    finally:
        _active = previous
        nib_logger.removeFilter(messages)
        if hf_quiet:
            os.environ.pop("HF_HUB_VERBOSITY", None)
            hf_logger.setLevel(hf_level)


def install_in_worker(enabled: bool) -> None:
    """For the whole life of a worker process: show library messages the s3d way if `enabled` (the
    parent's `active()`), once per distinct line in this worker."""
    global _active
    if not enabled or _active is not None:  # a forked worker already has the parent's
        return
    _active = _LibraryMessages()
    logging.getLogger(_NIBABEL_LOGGER).addFilter(_active)
    warnings.showwarning = _active.showwarning
