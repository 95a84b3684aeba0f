"""Layer 1: metrics, traces and the access log."""
