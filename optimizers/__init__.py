"""Compression methods: one module per method, each a frozen, versioned config plus a handler,
dispatched on the config's type from one explicit registry (`optimizers.registry.METHODS`).

Heavy libraries (torch, llm-compressor) are imported inside handlers only: the gateway imports
the configs to validate requests, and the jobs run in the compression environment
(`.venv-compress`) as `python -m optimizers quantize ...`.
"""
