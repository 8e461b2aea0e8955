"""tailorlm: one shared base model, one small private PEFT module per user."""

__version__ = "0.1.0"
