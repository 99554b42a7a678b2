"""Output writers: DeepSpeed universal, consolidated safetensors/torch, and same-format reshard outputs."""
