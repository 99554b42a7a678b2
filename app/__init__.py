"""ckpt-explorer's Textual app: browse checkpoints, preview a conversion, convert with live progress."""
