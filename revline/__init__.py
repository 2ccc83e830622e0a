"""Revline: a lossless telemetry pipeline for cars."""

__version__ = "0.1.0"
