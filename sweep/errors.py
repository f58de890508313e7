"""The errors sweep raises on purpose. The command line turns an InputError into one line and exit code 2; anything
else is a bug or a failure of the environment and keeps its traceback (in a log file, or on screen with --debug)."""


class InputError(ValueError):
    """Bad input found before anything ran (a spec, a model, a dataset, a path): the message is one line naming the
    field and the fix. Nothing has been recorded when it is raised."""
