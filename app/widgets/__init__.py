"""Widgets of the ckpt-explorer app, one per file."""
