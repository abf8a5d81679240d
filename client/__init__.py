"""specdec client: the Python library and the ``specdec`` CLI.

from client import SpecDecClient
with SpecDecClient("localhost:50051", drafter="localhost:50052") as c:
    for piece in c.stream("def fib(n):", max_new_tokens=64):
        print(piece.text, end="", flush=True)
"""

__all__ = ["ClientSecurity", "GenerationResult", "SpecDecClient", "SpecDecError", "StreamPiece"]


def __getattr__(name: str):
    # imported on first use: `specdec serve-*` must set the OpenMP environment before torch loads
    if name == "ClientSecurity":
        from specdec.security import ClientSecurity

        return ClientSecurity
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
