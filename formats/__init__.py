"""File formats: NE (neural-speed), GGUF and Hugging Face checkpoint readers, shard manifest."""
