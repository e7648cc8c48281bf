"""Typed adapter errors; the HTTP layer maps each class to one status code.

Every message says what went wrong and what the user can do about it, because it is
shown verbatim to whoever uploaded or requested the adapter.
"""


class AdapterError(Exception):
    """Base class: something about an adapter failed (HTTP 500 unless a subclass says otherwise)."""


class AdapterRejected(AdapterError, ValueError):
    """The adapter or the request naming it is invalid (HTTP 400); nothing was stored."""


class AdapterNotFound(AdapterError, KeyError):
    """No adapter visible to this tenant has that name or version (HTTP 404).

    Another tenant's private adapter raises this too, with the same message, so a
    caller cannot probe for names it does not own.
    """

    def __str__(self) -> str:
        # KeyError.__str__ repr-quotes its argument; a user-facing message must not be.
        return str(self.args[0]) if self.args else ""


class AdapterConflict(AdapterError):
    """The request conflicts with the store's state, e.g. an ambiguous shared name (HTTP 409)."""
