"""Errors that reach the user as one clear paragraph, never as a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing dataset, a gin typo, a wiring error.

    Every command-line entry point prints the message alone and exits with
    status 1 (see `trainer.cli.run`).
    """


# A tf.data pipeline cannot raise a UserError: a check inside it (a corrupt TFRecord shard with
# on_corrupt='stop') fails with a TensorFlow error whose message holds this mark and then the one line
# for the user. `trainer.cli.run` prints that line alone (see `data_error_line`).
DATA_ERROR_MARK = "[data error] "


def data_error_line(err):
    """The user's line of a TensorFlow error raised by an in-pipeline data check, or None for any other error."""
    message = getattr(err, "message", None) or str(err)
    if DATA_ERROR_MARK not in message:
        return None
    line = message[message.index(DATA_ERROR_MARK) + len(DATA_ERROR_MARK):].split("\n")[0].strip()
    return line.removesuffix("]").replace("\\'", "'")  # (tf.debugging.Assert prints its data as [message].)
