"""The HTTP surface: OpenAI-compatible routes, adapter and vLLM-compatible routes, auth, metrics."""

from .app import build_app
from .settings import ServerSettings

__all__ = ["build_app", "ServerSettings"]
