"""`python -m llmtune` — the entry point `accelerate launch -m llmtune` and torchrun use."""

from llmtune.cli import main

if __name__ == "__main__":
    main()
