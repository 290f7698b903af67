"""The one exception type for the user's mistakes.

Raised anywhere (bad path, bad checkpoint, unknown model or target, ...), caught once in the CLI, which prints
``error: <message>`` on stderr and exits with code 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us; the message is one line that says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
