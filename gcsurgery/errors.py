"""The one exception users see."""


class GCSurgeryError(ValueError):
    """Bad input to gcsurgery: the message says what was wrong, the value, and what to do."""
