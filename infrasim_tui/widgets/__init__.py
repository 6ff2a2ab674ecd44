"""Textual widgets of the operator console, one per module."""
