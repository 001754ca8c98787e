"""The one error type for problems a user can fix (bad file, bad URL, bad credentials).

Its message is a single line that names the file or URL and the problem; the CLI prints it
as is and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class WeightsmithError(Exception):
    """A user-facing error: one line, naming the file and the problem."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")
