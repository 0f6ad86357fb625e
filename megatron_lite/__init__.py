"""megatron-lite: a small, readable Megatron-style pretraining system."""

__version__ = "0.1.0"
