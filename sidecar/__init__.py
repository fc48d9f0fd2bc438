"""Sidecar: an AI gateway that runs next to one application."""

__version__ = "0.1.0"
