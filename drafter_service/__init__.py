"""The drafter service: a small model that streams blocks of drafted tokens to the verifier."""
