"""COALA: convex preference alignment of a frozen language model with a two-layer ReLU head."""

__version__ = "0.1.0"
