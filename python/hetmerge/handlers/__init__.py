"""Built-in handlers of the tracer (hetmerge.trace): one file per family of kinds.

Importing this package registers them; ``hetmerge.trace.trace_spec`` does so on first use.
"""
from . import elementwise, layers, shape  # noqa: F401
