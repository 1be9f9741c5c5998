"""Loading tokenizers and models, attaching adapters."""
