"""The multi-user engine: one frozen base model, every user's module in one batch."""
