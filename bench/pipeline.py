"""Benchmark: one pass (netp pipeline) against convert alone, and reshard against shard.

On bench/convert.py's random LLaMA-shaped f32 safetensors checkpoint (1.6 GB,
sharded with an index), one run of each, in the same run:
- `netp pipeline --outtype q4_0 --ranks 2` wall time against `netp convert
  --outtype f32` alone (the first of the three steps): goal <= 1.0x, as the
  pipeline writes ~7x fewer bytes;
- the pipeline process's max RSS (`/usr/bin/time -f %M`) against the largest
  tensor in f32: goal <= largest tensor + 300 MB;
- `netp reshard` of the 2-rank set to 3 ranks against `shard --ranks 3` of
  the q4_0 source (the three-step file, quantized from the converted one).
Every subprocess starts after a sync, start-up included. The machine may be
shared: the figures are one run each, printed as measured.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import build_checkpoint  # noqa: E402  (bench/convert.py: the same checkpoint)


def run(time_bin: str, rss_file: Path, cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, max RSS bytes) of one subprocess, after a sync."""
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run([time_bin, "-f", "%M", "-o", str(rss_file), *cmd], check=True)
    return time.perf_counter() - t, int(rss_file.read_text().split()[-1]) * 1024


def main() -> int:
    time_bin = shutil.which("time", path="/usr/bin")
    if time_bin is None:
        print("bench/pipeline.py needs /usr/bin/time (apt-get install -y time)", file=sys.stderr)
        return 1
    bindir = Path(sys.executable).parent
    netp = shutil.which("netp") or str(bindir / "netp")
    shard = shutil.which("shard") or str(bindir / "shard")
    with tempfile.TemporaryDirectory(prefix="netp-bench-pipeline-", dir=os.environ.get("NETP_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        src = tmp / "model"
        src.mkdir()
        t = time.perf_counter()
        total, largest = build_checkpoint(src)
        print(f"checkpoint: {total / 1e9:.2f} GB of f32, largest tensor {largest / 1e6:.0f} MB "
              f"(built in {time.perf_counter() - t:.0f} s)")
        rss = tmp / "rss"

        convert_s, convert_rss = run(time_bin, rss, [netp, "convert", "--quiet", "--outtype", "f32",
                                                     "--outfile", str(tmp / "ne-f32.bin"), str(src)])
        pipe_s, pipe_rss = run(time_bin, rss, [netp, "pipeline", "--quiet", str(src), str(tmp / "p2"),
                                               "--outtype", "q4_0", "--ranks", "2"])
        quantize_s, _ = run(time_bin, rss, [netp, "quantize", "--quiet", str(tmp / "ne-f32.bin"),
                                            str(tmp / "ne-q4_0.bin"), "--type", "q4_0"])
        shard2_s, _ = run(time_bin, rss, [shard, "--quiet", "--ranks", "2", str(tmp / "ne-q4_0.bin"), str(tmp / "s2")])
        same = subprocess.run(["diff", "-r", str(tmp / "p2"), str(tmp / "s2")], capture_output=True).returncode == 0
        shard3_s, _ = run(time_bin, rss, [shard, "--quiet", "--ranks", "3", str(tmp / "ne-q4_0.bin"), str(tmp / "s3")])
        reshard_s, reshard_rss = run(time_bin, rss, [netp, "reshard", "--quiet", str(tmp / "s2"), "--ranks", "3",
                                                     str(tmp / "r3")])
        resame = subprocess.run(["diff", "-r", str(tmp / "r3"), str(tmp / "s3")], capture_output=True).returncode == 0
        written = sum(p.stat().st_size for p in (tmp / "p2").rglob("*") if p.is_file())

    three = convert_s + quantize_s + shard2_s
    print(f"pipeline q4_0 x2 wall {pipe_s:.2f} s / convert f32 alone {convert_s:.2f} s = {pipe_s / convert_s:.2f}x "
          f"(goal <= 1.0x); three steps {three:.2f} s (convert + quantize {quantize_s:.2f} + shard {shard2_s:.2f}); "
          f"pipeline wrote {written / 1e6:.0f} MB, convert {total / 1e6:.0f} MB")
    print(f"pipeline max RSS {pipe_rss / 1e6:.0f} MB vs largest tensor {largest / 1e6:.0f} MB: "
          f"{(pipe_rss - largest) / 1e6:+.0f} MB (goal <= +300 MB); convert's {convert_rss / 1e6:.0f} MB")
    print(f"reshard 2 -> 3 wall {reshard_s:.2f} s / shard --ranks 3 of the source {shard3_s:.2f} s = "
          f"{reshard_s / shard3_s:.2f}x; reshard max RSS {reshard_rss / 1e6:.0f} MB")
    print(f"byte-identical: pipeline == three steps: {same}; reshard == shard: {resame}")
    return 0 if same and resame else 1


if __name__ == "__main__":
    sys.exit(main())
