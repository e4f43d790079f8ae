"""The online service: Ray Serve deployments hosting vLLM engines behind OpenAI routes."""

from raylm.serve.builder import APP_NAME, build_app

__all__ = ["APP_NAME", "build_app"]
