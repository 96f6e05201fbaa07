"""quantgate: an OpenAI-compatible gateway that routes along a precision ladder of one model."""

__version__ = "0.1.0"
