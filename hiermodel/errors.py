"""The one exception type for bad user input; the CLI turns it into exit code 2."""


class UserError(Exception):
    """Bad input from the user: a path, a config value, a checkpoint. The message is shown as is."""
