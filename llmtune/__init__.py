"""llmtune: pretrain and fine-tune Transformer language models from YAML recipes."""

__version__ = "0.1.0"
