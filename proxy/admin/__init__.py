"""Layer 4: the admin API and its command line."""
