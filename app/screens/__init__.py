"""Screens of the ckpt-explorer app: browse, preview, convert, help and the modals."""
