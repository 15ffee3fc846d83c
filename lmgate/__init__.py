"""LMGate: an allow-listing, usage-recording gateway for LLM APIs."""
