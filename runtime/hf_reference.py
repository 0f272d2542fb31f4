"""transformers as verify's independent reference (`--hf`), in float32
(docs/design.md §5, "Layer-streamed references").

transformers' own modeling code, config, masks and rotary run unchanged; for
a checkpoint in safetensors (a folder, or a hub id in the local cache) the
weights stream: the model is built with its parameters on the meta device
(accelerate's init_empty_weights; buffers such as rotary inv_freq are made
on the CPU as usual), and each decoder layer's tensors (and the embedding's, the final norm's, the
head's) are read from the checkpoint by a forward pre-hook and dropped by a
forward hook. Every safetensors file is opened for
one layer's read and closed after it, so no mapped page stays resident.
Memory: about one layer (or the embedding, or the head) in f32 and the activations: the
embedding, final norm and head are read and dropped the same way.

Loaded whole instead (memory: the model in f32): a `.gguf` (transformers'
GGUF reader dequantizes the whole file), a `pytorch_model.bin` checkpoint,
and a model whose parameters transformers renames or fuses on loading (its
checkpoint names do not match the modules': some mixtures of experts).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from netp.errors import NetpError
from netp.formats.paths import read_json
from netp.runtime.comparisons import Pass


def _quiet_progress() -> None:
    """netp's rule: progress bars on a terminal only."""
    if sys.stderr.isatty():
        return
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if getattr(hf_gguf, "tqdm", None) is not None:  # its GGUF reader calls tqdm directly
        hf_gguf.tqdm = functools.partial(hf_gguf.tqdm, disable=True)


def _local_folder(hf: str) -> Path | None:
    """The checkpoint folder of `hf`: itself, or a hub id's snapshot in the local cache (never the network)."""
    p = Path(hf)
    if p.is_dir():
        return p
    if p.suffix == ".gguf":
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a cached hub id: from_pretrained names the problem
        return None


def weight_files(folder: Path) -> dict[str, Path] | None:
    """Checkpoint tensor name -> its safetensors file, or None when the checkpoint is not safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, what="a safetensors index").get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _read(files: dict[str, Path], names: Sequence[str]) -> dict[str, Any]:
    """These tensors as f32 torch tensors, each file opened for the read and closed after it."""
    import torch
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = defaultdict(list)
    for n in names:
        by_file[files[n]].append(n)
    out = {}
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for n in group:
                out[n] = f.get_tensor(n).to(torch.float32)
    return out


def _decoder_layers(model: Any, n_layer: int) -> tuple[str, Any]:
    """(name, module list) of the decoder layers: the ModuleList of n_layer entries."""
    import torch

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layer]
    if len(found) != 1:
        raise NetpError(None, f"cannot find transformers' {n_layer} decoder layers in {type(model).__name__}")
    return found[0]


def _drop(module: Any) -> None:
    """Put a layer's parameters back on the meta device: their memory is freed."""
    import torch

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _streamed_model(folder: Path, files: dict[str, Path]) -> Any | None:
    """The model with its decoder layers streamed, or None when its parameter names are not the checkpoint's."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    n_layer = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    prefix, layers = _decoder_layers(model, n_layer)
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    # A head missing from the files reads the embedding only when the config ties them; otherwise the
    # checkpoint names it differently (GPT-NeoX's embed_out is transformers 5's lm_head): run it whole.
    tie = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    tied = {n for n in params if tie and n not in files and n.startswith("lm_head.")}
    if any(n not in files for n in params if n not in tied):
        return None
    embedding = model.get_input_embeddings()
    embedding_name = next(n for n, m in model.named_modules() if m is embedding) + ".weight"

    def load(head: str, module: Any, args: Any) -> None:
        names = [n for n in params if n.startswith(head)]
        source = {n: embedding_name if n in tied else n for n in names}  # a tied head reads the embedding
        tensors = _read(files, sorted(set(source.values())))
        module.load_state_dict({n[len(head):]: tensors[source[n]] for n in names}, strict=False, assign=True)

    # Each module holding parameters outside the decoder layers (embedding, final norm, head) and each
    # decoder layer: read by a pre-hook, dropped by a hook. Tied heads get their own copy.
    units = [(f"{prefix}.{i}.", layer) for i, layer in enumerate(layers)]
    units += [(f"{n}." if n else "", m) for n, m in model.named_modules()
              if not (n + ".").startswith(prefix + ".") and any(True for _ in m.parameters(recurse=False))]
    if tied:
        for name in tied:
            owner, attr = name.rsplit(".", 1)
            model.get_submodule(owner)._parameters[attr] = torch.nn.Parameter(
                torch.empty_like(embedding.weight, device="meta"), requires_grad=False)
    for head, module in units:
        module.register_forward_pre_hook(functools.partial(load, head))
        module.register_forward_hook(lambda module, args, output: _drop(module))
    return model


def transformers_pass(hf: str, tokens: Sequence[int], threads: int) -> Pass:
    """transformers' logits, hidden states (and a mixture of experts' routing) of `tokens` in float32 (hf: a folder, a cached hub id,
    or a .gguf file); a safetensors checkpoint's decoder layers streamed one at a time."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise NetpError(hf, f"--hf needs torch and transformers ({e}); install netp[torch]") from e
    torch.set_num_threads(max(1, threads))
    _quiet_progress()
    p = Path(hf)
    is_gguf = p.suffix == ".gguf" and p.is_file()
    if importlib.util.find_spec("accelerate") is None:  # from_pretrained(gguf_file=) and the streaming need it
        raise NetpError(hf, "--hf needs accelerate; install netp[torch]")
    try:
        folder = None if is_gguf else _local_folder(hf)
        files = None if folder is None else weight_files(folder)
        model = None if folder is None or files is None else _streamed_model(folder, files)
        if model is None:
            if is_gguf:  # transformers' GGUF reader dequantizes and undoes the q/k permutation
                model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(folder or hf), dtype=torch.float32,
                                                             local_files_only=True)
            model.eval()
    except NetpError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise NetpError(hf, f"transformers cannot load it: {type(e).__name__}: {e}") from e
    k = getattr(model.config, "num_experts_per_tok", None)  # a mixture of experts: its routing too
    with torch.no_grad():
        out = model(torch.tensor([list(tokens)]), output_hidden_states=True,
                    **({"output_router_logits": True} if k else {}))
    states = [h[0].float().numpy() for h in out.hidden_states]
    # transformers' routing: torch.topk over the softmax of each MoE layer's router logits (T, E)
    experts = [torch.topk(torch.softmax(r.float(), dim=-1), k, dim=-1).indices.numpy()
               for r in out.router_logits] if k else None
    return Pass(f"transformers ({p.name})", out.logits[0].float().numpy(), states, experts or None)
