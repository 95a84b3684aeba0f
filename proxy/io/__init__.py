"""Layer 1: I/O building blocks the layers above share: batched socket writes, the per-request deadline timer,
the Redis client."""
