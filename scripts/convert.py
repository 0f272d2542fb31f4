#!/usr/bin/env python
"""neural-speed-compatible convert entry point (the same command as `netp convert`).

    python scripts/convert.py --outtype f32 --outfile ne-f32.bin MODEL

MODEL: an HF model folder, a hub id already in the local Hugging Face cache,
or a .gguf file. The tokenizer is written beside the output as
`<stem>.tokenizer/`. See `--help`.
"""
import sys

from netp.convert.cli import convert_command

if __name__ == "__main__":
    convert_command.main(args=sys.argv[1:], prog_name="convert.py")
