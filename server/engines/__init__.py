"""Engines: one vLLM OpenAI server per variant, local subprocess or remote URL, one client path."""
