"""MODEL -> shard set in one pass: convert, quantize and shard with no unsharded file."""
