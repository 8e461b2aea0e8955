"""The one error the users layer raises for a mistake in what was asked (an unknown user, a bad id, an
unknown task or kind): the command line prints it as one line, the server answers it with a 4xx."""

from __future__ import annotations


class UserError(ValueError):
    """What was asked cannot be done as asked; the message says why, in one line."""
