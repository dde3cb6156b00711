"""bitalloc: from a model to a per-layer bit map and back.

One subpackage per stage of the data path: ``model`` -> ``measure`` -> ``table`` -> ``solvers`` ->
``quantize`` -> ``runtime`` / ``gguf`` -> ``evaluate``; ``jobs`` holds the flows that chain them
and ``cli`` the ``bitalloc`` command on top.
"""

__version__ = "0.1.0"
