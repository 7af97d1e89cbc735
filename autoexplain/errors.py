"""One exception type for mistakes a user can fix.

The CLI prints `UserError` as a single line and exits non-zero; every other exception is a bug and
keeps its traceback. Messages name the problem first and the fix second.
"""


class UserError(Exception):
    """Bad input: a missing file, an unknown model, a layer out of range, ..."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)

    def __reduce__(self):
        # Keep problem and fix apart across processes (a stage run in a worker process).
        return (type(self), (self.problem, self.fix))


class LayerMismatch(UserError):
    """A coder and the layer asked of it (or none asked) that do not go together: a fault of the layer
    parameter, which commands spell differently (`--layer`, `--layers`, `layers`). `template` is the
    fix with `{layer}` where the parameter goes (`fix_for`); alone it reads 'the layer'."""

    def __init__(self, problem: str, template: str):
        self.template = template
        super().__init__(problem, template.format(layer="the layer"))

    def __reduce__(self):
        return (type(self), (self.problem, self.template))

    def fix_for(self, parameter: str) -> str:
        return self.template.format(layer=parameter)


# How a record's `failure` starts when its LLM request got no answer (retries ran out): a fault of the
# server, not of the record, so the stage asks it again on the next run (`storage.UNANSWERED`).
NO_ANSWER = "request failed"
