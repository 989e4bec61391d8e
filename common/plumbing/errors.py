"""The one exception a lesson raises for a problem the learner can fix."""


class LessonError(Exception):
    """A problem the learner can fix (a missing file, a bad flag): one line, no traceback."""
