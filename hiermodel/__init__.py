"""hiermodel: byte-level and hierarchical language models in JAX."""

from hiermodel.platforms import skip_absent_tpu

__version__ = "0.1.0"

skip_absent_tpu()  # before any backend starts: every entry point (CLI, tools, notebooks) imports this
