"""The OpenAI-compatible HTTP server (`spectr serve`)."""

from spectr.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
