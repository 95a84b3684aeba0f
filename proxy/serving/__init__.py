"""Layer 2: the HTTP server: its protocol, ASGI helpers, middleware, lifecycle and the auth-failure guard."""
