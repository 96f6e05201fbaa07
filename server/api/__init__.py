"""The HTTP layer: OpenAI endpoints, operations endpoints, auth and request schemas."""
