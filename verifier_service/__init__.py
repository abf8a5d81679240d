"""The verifier service: the target model, the public Generate API and the session-based Verify rpc."""
