"""The one exception a lesson raises for a problem the learner can fix."""


class LessonError(Exception):
    """A problem the learner can fix (a missing file, a bad flag): one line, no traceback."""

    def _render_traceback_(self):  # IPython's hook: in a notebook cell, this line, not a traceback
        return [f"error: {self}"]
