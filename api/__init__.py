"""The HTTP surface: OpenAI-compatible routes, adapter and vLLM-compatible routes, auth, metrics."""

from .app import build_app
from .settings import ServerSettings

__all__ = ["build_app", "ServerSettings", "ray_app"]


def __getattr__(name: str):
    # the Ray Serve scale-out is an optional extra: import Ray only when it is asked for
    if name == "ray_app":
        from .ray_deploy import ray_app
        return ray_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
