"""tunesmith: fine-tune, evaluate, predict with, export and serve large language models."""

__version__ = "0.1.0"
