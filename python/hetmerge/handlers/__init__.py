"""Built-in handlers of the tracer (hetmerge.trace): one file per family of kinds.

Importing this package registers them; ``hetmerge.trace.trace_spec`` does so on first use.
"""
from . import attend, attention, conv_families, elementwise, functional, heads, layers, layout, shape  # noqa: F401
