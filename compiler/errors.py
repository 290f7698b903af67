"""The exception types for the user's mistakes.

Raised anywhere (bad path, bad checkpoint, unknown model or target, ...), caught once in the CLI, which prints
``error: <message>`` on stderr and exits with code 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us; the message is one line that says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class SettingError(UserError):
    """A setting with a value out of range: ``field`` is its name in the settings dataclass (the Python keyword),
    ``problem`` what is wrong with it. The library says ``batch must be ...``; the CLI names the flag the field
    came from (``--batch must be ...``)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, " ".join(str(problem).split())
        super().__init__(f"{field} {self.problem}")

    def as_flag(self) -> str:
        return f"--{self.field.replace('_', '-')} {self.problem}"
