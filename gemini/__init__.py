"""gemini: fast failure recovery with in-memory, replicated checkpoints."""

__version__ = "0.1.0"
