"""The one exception type the CLI turns into a clean, traceback-free error message."""


class SmileError(Exception):
    """A problem with the user's inputs, options or output folder, with what to do about it.

    The message names the file, the tensor or field, and the fix. The CLI prints it without a
    traceback (unless `--debug`) and exits non-zero.
    """
