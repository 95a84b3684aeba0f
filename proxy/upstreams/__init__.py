"""Layer 2: the upstreams: pool, selection, health, providers, transport, failover and the mock."""
