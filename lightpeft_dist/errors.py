"""User-facing errors.

Every problem a user can fix (bad recipe, wrong file, unsupported model) raises `LightPeftError` with one sentence
naming the problem and the fix. The CLI prints it as a single `error:` line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class LightPeftError(Exception):
    """A problem with the user's input, reported as one line."""
