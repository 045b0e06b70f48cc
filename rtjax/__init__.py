"""rtjax: train, compress, compile and measure models for real-time inference."""

__version__ = "0.1.0"
