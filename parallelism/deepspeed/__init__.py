"""The deepspeed engine (engine.py) and what it supports (support.py, imports no DeepSpeed)."""
