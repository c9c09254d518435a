"""Integrations with other training frameworks: :mod:`lightning_sparse.integrations.transformers` (Hugging Face
``transformers.Trainer``). Each module imports its framework only when it is imported itself."""
