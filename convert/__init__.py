"""HF checkpoint dir | cached hub id | .gguf  ->  NE f32/f16, streaming."""
