"""raylm: LLM inference on Ray Serve + vLLM."""

__version__ = "0.1.0"
