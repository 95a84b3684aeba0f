"""Layer 1: the config, parsed once from YAML into frozen typed objects; hot reload; egress and TLS settings."""
