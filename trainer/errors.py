"""Errors that reach the user as one clear paragraph, never as a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing dataset, a gin typo, a wiring error.

    Every command-line entry point prints the message alone and exits with
    status 1 (see `trainer.cli.run`).
    """
