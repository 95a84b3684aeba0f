"""Shared pytest setup. Fixtures live in the helper modules that own them."""
