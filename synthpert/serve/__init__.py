"""`synthpert serve`, the local endpoint: app.py (bodies, the micro-batcher, the routes, ``serve``), http.py (the
error shape, request ids, the guard middleware) and stream.py (server-sent events). See app.py for the routes
and the security defaults."""

from __future__ import annotations

from .app import create_app, serve, served_model_name

__all__ = ["create_app", "serve", "served_model_name"]
