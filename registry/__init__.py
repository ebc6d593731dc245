"""Model registry and versioning service for base models, LoRA adapters, fine-tunes and merges."""

__version__ = "0.1.0"
