"""Why a generation did not run to its end, as exceptions every layer may name: the runtime raises them,
the services map them to status codes (``specdec/rpc.py``) without importing the runtime."""


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (the message names it)."""


class GenerationCancelled(RuntimeError):
    """The generation was abandoned (its client went away)."""
