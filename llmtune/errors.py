"""The one exception type that means "the user's input is wrong"."""


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2.

    The message must say what is wrong and how to fix it (file, key, column, value).
    """
