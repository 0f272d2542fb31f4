"""NE f32/f16 -> q4_0 / q4_1 / q8_0 blocks, bit-exact with ggml."""
