"""Integrations with the tools users already run: Hugging Face transformers, PEFT, lm-eval."""
