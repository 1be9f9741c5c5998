"""The OpenAI-compatible server (`tunesmith serve`)."""
