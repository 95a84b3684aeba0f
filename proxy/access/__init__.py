"""Layer 2: who may send what: keys (static and issued), quotas, their stores and the Redis pipe."""
