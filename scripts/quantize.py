#!/usr/bin/env python
"""neural-speed-compatible quantize entry point (a thin wrapper over netp's quantize stage).

    python scripts/quantize.py --model_name llama --model_file ne-f32.bin \
        --out_file ne-q4_0.bin --weight_dtype int4

Flags as neural-speed's scripts/quantize.py: --weight_dtype {int4,int8},
--alg {sym,asym}, --group_size 32, --nthread, --model_name (checked against
the file), --use_ggml and --scale_dtype fp32 accepted; see `--help`.
"""
from netp.quantize.cli import ns_main

if __name__ == "__main__":
    ns_main()
