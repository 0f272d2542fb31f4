"""An NE file's (or a manifest's) architecture and hparams, its header held against its tensors."""
from __future__ import annotations

from typing import Any, Mapping

from netp.errors import NetpError
from netp.models.architecture import Architecture
from netp.models.checks import check_hparams
from netp.models.hparams import HParams
from netp.models.registry import by_ne_tensors


def ne_model(header: Any, shapes: Mapping[str, tuple[int, ...]], path: str) -> tuple[Architecture, HParams]:
    """The architecture and hparams of an NE file (or a manifest), its header and
    tensors checked against each other: whole heads, a rotary width that fits a
    head, and exactly the tensors the header implies with the shapes it implies
    (the output head may be absent: tied to the embedding). The layer count is
    bounded by the tensor count before the expected tensors are listed, so a
    corrupt header cannot make that list huge."""
    arch = by_ne_tensors(shapes, path)
    try:
        hp = arch.hparams_from_ne(header, shapes)
    except KeyError as e:
        raise NetpError(path, f"missing tensor {e.args[0]} that the {arch.name} header needs") from e
    check_hparams(hp, path, n_tensors=len(shapes), source="header")
    expected = arch.tensor_shapes(hp)
    for name, shape in shapes.items():
        if name not in expected:
            raise NetpError(path, f"tensor {name} is not part of a {arch.name} model with {hp.n_layer} layers")
        if tuple(expected[name]) != tuple(shape):
            raise NetpError(path, f"tensor {name} has shape {list(shape)}, the header implies {list(expected[name])}")
    missing = [n for n in expected if n not in shapes and n != arch.output_name]
    if missing:
        raise NetpError(path, f"missing tensor {missing[0]} of a {arch.name} model with {hp.n_layer} layers "
                              "(truncated or wrong header?)")
    return arch, hp
