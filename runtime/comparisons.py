"""verify's results as data (docs/design.md §5, "Verification" and "Reports").

Each check is one `Comparison` record: its figures, the limits they are
held to (each a figure, `<=` or `>=`, a value), per-position rows, and on
failure the first diverging hidden state. The printed tables, the JSON
report and the JUnit XML are all rendered from these records, so they
cannot disagree. Kinds: "logits" (two runs of the same weights: max |dlogit|
and the argmax-margin rule), "kl" (a lossy step: mean KL divergence and
top-1 agreement, llama.cpp's --kl-divergence figures), "routing" (mixtures
of experts: the share of (token, layer) pairs routed alike) - a new kind is
a new record maker, nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from netp.errors import NetpError


@dataclass
class Pass:
    """One model's teacher-forced run: logits (T, V), hidden states (n_layer + 1) x (T, n_embd) and,
    for a mixture of experts, the experts each MoE layer routed each token to, (T, k) per MoE layer."""

    name: str
    logits: np.ndarray
    states: list[np.ndarray] | None = None
    experts: list[np.ndarray] | None = None


@dataclass(frozen=True)
class Limit:
    """A figure held to a value: figure <= value, or figure >= value."""

    figure: str
    op: str  # "<=" or ">="
    value: float

    def holds(self, x: float) -> bool:
        return bool(x <= self.value) if self.op == "<=" else bool(x >= self.value)


@dataclass
class Comparison:
    id: str  # stable across runs: "target", "f32-vs-transformers", "quantized-vs-f32", "kernel-modes", ...
    title: str
    kind: str  # "logits", "kl", "routing"
    figures: dict[str, Any]
    limits: list[Limit]
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: tuple[str, ...] = ()  # the row keys the printed table shows (none: no table)
    first_diverging_layer: dict[str, Any] | None = None
    seconds: float = 0.0  # the runs this comparison added

    @property
    def failed(self) -> list[Limit]:
        return [lim for lim in self.limits if not lim.holds(self.figures[lim.figure])]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def reason(self) -> str:
        """The one-line failure reason ("" when passed)."""
        if self.passed:
            return ""
        parts = []
        for lim in self.failed:
            where = self.figures.get(f"{lim.figure}_position")
            parts.append(f"{LABELS.get(lim.figure, lim.figure)} {_fmt(self.figures[lim.figure])} "
                         f"{'>' if lim.op == '<=' else '<'} {lim.value:g}"
                         + (f" at position {where}" if where is not None else ""))
        text = f"{self.title}: {'; '.join(parts)}"
        if self.kind == "logits":
            text += f"; {diverging_text(self.first_diverging_layer)}"
        return text


LABELS = {"max_dlogit": "max |dlogit|", "argmax_differs": "positions whose argmax differs beyond the margin",
          "mean_kl": "mean KL divergence", "top1": "top-1 agreement", "routing": "routing agreement"}


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.array(x, dtype=np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_divergence(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(ref || other) per row from both log-probabilities, over the whole vocabulary."""
    return (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)


# -- first diverging layer -----------------------------------------------------------------

def first_diverging_layer(ref: list[np.ndarray] | None, other: list[np.ndarray] | None, bound: float,
                          n_compare: int | None = None) -> dict[str, Any]:
    """The first hidden state differing by more than bound x its scale (max |h| of the reference's).
    States: [0] enters layer 0 (the embeddings), [i] leaves layer i - 1.
    Returns {"state": i, "layer": i - 1 (None: the embeddings), "max_dh", "scale", "bound"}, or
    {"state": None, "why": ...} when none differs or the states are unavailable."""
    if not ref or not other:
        return {"state": None, "why": "hidden states unavailable"}
    n = min(len(ref), len(other)) if n_compare is None else n_compare
    for i in range(n):
        scale = float(np.abs(ref[i]).max()) or 1.0
        diff = float(np.abs(ref[i] - other[i]).max())
        if diff > bound * scale:
            return {"state": i, "layer": None if i == 0 else i - 1, "max_dh": diff, "scale": scale, "bound": bound}
    return {"state": None, "why": f"every hidden state compared agrees within {bound:g} of its scale; the "
                                  "difference arises after them (final norm or output head)"}


def diverging_text(d: dict[str, Any] | None) -> str:
    if d is None:
        return "hidden states not compared"
    if d["state"] is None:
        return d["why"]
    where = "the token embeddings" if d["layer"] is None else f"layer {d['layer']}"
    return f"first diverging hidden state: {where} (max |dh| {d['max_dh']:.3g} > {d['bound']:g} x scale " \
           f"{d['scale']:.3g})"


# -- the records ---------------------------------------------------------------------------

def _token_text(tokenizer: Any, token: int) -> str:
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    return repr(text)[1:-1][:14]


def compare_logits(id: str, title: str, ref: Pass, other: Pass, tokens: Sequence[int], max_dlogit: float,
                   tokenizer: Any, n_states: int | None = None) -> Comparison:
    """Two runs of the same weights: max |dlogit| <= max_dlogit, and the argmax the same wherever the
    reference's top-2 margin exceeds max_dlogit (inside it, a near-tie: reported, not failed)."""
    if ref.logits.shape != other.logits.shape:
        raise NetpError(None, f"{title}: logits have shape {other.logits.shape} vs {ref.logits.shape} (another "
                              "vocabulary)")
    rows: list[dict[str, Any]] = []
    for pos, (a, b) in enumerate(zip(ref.logits, other.logits)):
        top2 = np.partition(a, -2)[-2:]
        margin = float(top2[1] - top2[0])
        same = int(np.argmax(a)) == int(np.argmax(b))
        rows.append({"position": pos, "token_id": int(tokens[pos]), "token": _token_text(tokenizer, tokens[pos]),
                     "max_dlogit": float(np.abs(a - b).max()), "margin": margin,
                     "argmax": "same" if same else "different" if margin > max_dlogit else "near-tie"})
    worst = max(range(len(rows)), key=lambda i: rows[i]["max_dlogit"])
    differs = [r["position"] for r in rows if r["argmax"] == "different"]
    figures = {"max_dlogit": rows[worst]["max_dlogit"], "max_dlogit_position": worst,
               "argmax_differs": len(differs), "argmax_differs_position": differs[0] if differs else None,
               "near_ties": sum(r["argmax"] == "near-tie" for r in rows), "positions": len(rows)}
    c = Comparison(id, title, "logits", figures,
                   [Limit("max_dlogit", "<=", max_dlogit), Limit("argmax_differs", "<=", 0)], rows,
                   ("token", "max_dlogit", "margin", "argmax"))
    if not c.passed:
        c.first_diverging_layer = first_diverging_layer(ref.states, other.states, max_dlogit, n_states)
    return c


def compare_kl(id: str, title: str, ref: Pass, other: Pass, tokens: Sequence[int], max_kl: float,
               min_top1: float, tokenizer: Any, table: bool = True) -> Comparison:
    """A lossy step (quantization, q8_0 activations): KL(ref || other) per position, its mean held to
    max_kl; the share of positions with the same most likely token held to min_top1."""
    ref_logp, logp = log_softmax(ref.logits), log_softmax(other.logits)
    kl = kl_divergence(ref_logp, logp)
    same = np.argmax(ref.logits, axis=-1) == np.argmax(other.logits, axis=-1)
    dlogit = np.abs(ref.logits - other.logits).max(axis=-1)
    rows = [{"position": pos, "token_id": int(tokens[pos]), "token": _token_text(tokenizer, tokens[pos]),
             "kl": float(kl[pos]), "top1": bool(same[pos]), "max_dlogit": float(dlogit[pos])}
            for pos in range(len(kl))]
    figures = {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1": float(same.mean()),
               "max_dlogit": float(dlogit.max()), "max_dlogit_position": int(dlogit.argmax()), "positions": len(kl)}
    return Comparison(id, title, "kl", figures, [Limit("mean_kl", "<=", max_kl), Limit("top1", ">=", min_top1)],
                      rows, ("token", "kl", "top1") if table else ())


def compare_routing(id: str, title: str, ref: Pass, other: Pass, tokens: Sequence[int], min_share: float | None,
                    tokenizer: Any) -> Comparison | None:
    """A mixture of experts: the share of (token, MoE layer) pairs where `other` chose the same experts
    as `ref` (as sets: the order among a token's k does not change the sum), held to min_share
    (None: reported only). None when either side has no routing (a dense model)."""
    if not ref.experts or not other.experts:
        return None
    if len(ref.experts) != len(other.experts):
        raise NetpError(None, f"{title}: {len(other.experts)} MoE layers vs {len(ref.experts)}")
    alike = np.stack([(np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1)
                      for a, b in zip(ref.experts, other.experts)], axis=1)  # (T, MoE layers)
    rows = [{"position": pos, "token_id": int(tokens[pos]), "token": _token_text(tokenizer, tokens[pos]),
             "layers_alike": int(alike[pos].sum())} for pos in range(alike.shape[0])]
    figures = {"routing": float(alike.mean()), "pairs_alike": int(alike.sum()), "pairs": int(alike.size),
               "moe_layers": alike.shape[1]}
    return Comparison(id, title, "routing", figures, [] if min_share is None else [Limit("routing", ">=", min_share)],
                      rows)


# -- the printed table ------------------------------------------------------------------------

# row key -> (header, width: > 0 right-aligned, < 0 left-aligned, 0 as it comes; cell format)
_COLUMNS = {"token": ("token", -16, "{}"), "max_dlogit": ("max|dlogit|", 12, "{:.3e}"),
            "margin": ("top-2 margin", 13, "{:.4f}"), "argmax": ("argmax", 0, "{}"), "kl": ("KL(ref||q)", 12, "{:.5f}"),
            "top1": ("top-1", 0, "{}")}


def _pad(text: str, width: int) -> str:
    return text.rjust(width) if width > 0 else text.ljust(-width)


def _cell(key: str, value: Any) -> str:
    if key == "top1":
        value = "same" if value else "different"
    _, width, fmt = _COLUMNS[key]
    return _pad(fmt.format(value), width)


def summary_line(c: Comparison) -> str:
    f = c.figures
    verdict = "PASS" if c.passed else "FAIL"
    limits = ", ".join(f"{lim.figure} {lim.op} {lim.value:g}" for lim in c.limits)
    if c.kind == "logits":
        n, skipped = f["positions"], f["near_ties"]
        return (f"max |dlogit| {f['max_dlogit']:.3e} (position {f['max_dlogit_position']}); argmax agrees at "
                f"{n - f['argmax_differs'] - skipped}/{n - skipped} positions"
                f"{f' ({skipped} near-ties skipped)' if skipped else ''} [{limits}]: {verdict}")
    if c.kind == "kl":
        return (f"mean KL divergence {f['mean_kl']:.6f}, max {f['max_kl']:.6f}; top-1 agreement "
                f"{f['top1'] * 100:.1f}% over {f['positions']} positions; max |dlogit| {f['max_dlogit']:.3e} "
                f"[{limits}]: {verdict}")
    if c.kind == "routing":
        return (f"the same experts at {f['pairs_alike']}/{f['pairs']} (token, MoE layer) pairs "
                f"({f['routing'] * 100:.1f}%) over {f['moe_layers']} MoE layers "
                f"[{limits or 'reported, not held'}]: {verdict}")
    figures = ", ".join(f"{k} {_fmt(v)}" for k, v in f.items())
    return f"{figures} [{limits}]: {verdict}"


def text_lines(c: Comparison) -> list[str]:
    """The printed table: a header, a row per position (for the columns the record names), the summary."""
    lines = [f"== {c.title}"]
    if c.columns:
        lines.append(f"  {'pos':>4}  " + " ".join(_pad(_COLUMNS[k][0], _COLUMNS[k][1]) for k in c.columns))
        for r in c.rows:
            lines.append(f"  {r['position']:>4}  " + " ".join(_cell(k, r[k]) for k in c.columns))
    lines.append(f"  {summary_line(c)}")
    if c.first_diverging_layer is not None:
        lines.append(f"  {diverging_text(c.first_diverging_layer)}")
    return lines
