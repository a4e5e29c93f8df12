"""Floodwall: an admission layer for AI model serving (Envoy ext_proc + Triton)."""

__version__ = "0.1.0"
