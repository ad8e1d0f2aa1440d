"""The ingress layer: HTTP routes only (read, authenticate, parse, resolve, dispatch, map
errors). ``app`` holds the Router deployment; ``core``, ``admin`` and ``listing`` the Ray-free
logic behind its routes."""
