"""Layer 3: the request pipeline and the APIs it serves: chat completions, models, SSE relays, OpenAPI."""
