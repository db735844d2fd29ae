"""aioffload: an LLM inference server that streams offloaded weights to a small GPU."""

__version__ = "0.1.0"
