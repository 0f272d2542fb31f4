"""Pickle safety (issue 17): a `.bin` checkpoint is loaded with
torch.load(weights_only=True) only, so a pickle that would run code is
refused with one error line and its code never runs."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BIN = Path(sys.executable).parent


class RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_checkpoint_that_runs_code_is_refused(tiny_hf_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_model("llama_gqa", "bin"), folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "pickle-ran"
    state["model.norm.weight"] = RunsCode(marker)
    torch.save(state, folder / "pytorch_model.bin")
    # The planted object really runs code when unpickled without weights_only.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "ne-f32.bin"
    p = subprocess.run([str(BIN / "netp"), "convert", "--outfile", str(out), str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"netp convert: error: {folder / 'pytorch_model.bin'}: ")
    assert "refused: the pickle holds objects other than tensors (it references io.open)" in lines[0]
    assert not marker.exists()  # nothing from the checkpoint executed
    assert not out.exists()
