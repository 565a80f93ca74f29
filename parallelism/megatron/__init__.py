"""The megatron engine (engine.py) and what it supports (support.py, imports no megatron-core)."""
