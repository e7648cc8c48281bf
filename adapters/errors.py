"""Typed errors of adapters and of the services built on the store (files, fine-tuning
jobs, batches); the HTTP layer maps each class to one status code (api/errors.py).

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


class ServiceError(Exception):
    """Base class: a request about a file, a fine-tuning job or a batch that the caller can
    correct. `message` is shown verbatim; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
