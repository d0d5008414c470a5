"""hiermodel: byte-level and hierarchical language models in JAX."""

__version__ = "0.1.0"
