"""specdec client: the Python library and the ``specdec`` CLI.

from client import SpecDecClient
with SpecDecClient("localhost:50051", drafter="localhost:50052") as c:
    for piece in c.stream("def fib(n):", max_new_tokens=64):
        print(piece.text, end="", flush=True)
"""

from .client import GenerationResult, SpecDecClient, StreamPiece

__all__ = ["GenerationResult", "SpecDecClient", "StreamPiece"]
