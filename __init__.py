"""disco: data pipeline and trainer for DisCo-style human dance generation."""

__version__ = "0.1.0"
