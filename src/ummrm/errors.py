"""The exception raised for bad user input: a message that names the value, the rule and the fix."""


class UmmrmError(ValueError):
    """Invalid input or configuration, reported to the user without a traceback by the CLI."""
