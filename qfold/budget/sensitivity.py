"""Per-layer sensitivity: the model output when only one layer is quantized, and when only one is kept float.

For every quantized layer ``L`` of a fake-quant model (weight per channel, plus the activation input
``L`` reads quantized) two variants are measured against the FP32 reference outputs:

* **only L quantized**: everything else float. Low SQNR / agreement = a fragile layer.
* **only L float**: everything else quantized, ``L`` reads its float input with its float weight
  (what ``keep_float`` does to ``L``; other readers of a shared quant point stay quantized).

Cost (the exact shortcut): per batch, one float pass and one all-quantized pass keep every node's
value; a variant only changes ``L`` and what depends on it, so only the nodes downstream of ``L``
(its *cone*) are re-evaluated, reading everything else from the kept values. The result is
bit-identical to running the whole model per variant (``method="full"`` does that, for the test
and the benchmark), at the cost of ``2 + 2 * sum(|cone(L)|) / |graph|`` forward passes instead of
``2 + 2 * #layers``; in a CNN the early layers hold most of the work and the late layers' cones are
small, so the saving grows with depth.

Caveat: keeping ``L`` float in the real export can also move a residual-add quant point (the plan
fuses the add with another branch); the variants here keep the placement fixed. The mixed-precision
search (:mod:`qfold.budget.fallback`) therefore uses this ranking only to order its candidates and
re-measures the real engine.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from calib.atomic import atomic_write_text
from qfold.inputs.rows import rows
from qfold.quant.modules import ActQuant, QuantLayer
from qfold.quant.plan import QuantPlan
from qfold.report import metrics as metrics

MODES = ("only_quantized", "only_float")


@dataclass(frozen=True)
class VariantMetrics:
    """Model output of one variant against the FP32 reference (accuracies are fractions)."""

    sqnr_db: float
    agreement: float
    top1: float | None = None  # None without labels
    drop_pp: float | None = None


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer: rank 1 is the most sensitive (lowest SQNR when it alone is quantized)."""

    rank: int
    name: str
    type: str
    only_quantized: VariantMetrics
    only_float: VariantMetrics
    cone_nodes: int


@dataclass
class SensitivityReport:
    """Every quantized layer, ranked, plus the all-float and all-quantized baselines and the cost."""

    layers: list[LayerSensitivity]
    all_quantized: VariantMetrics
    all_float: VariantMetrics
    reference_top1: float | None
    samples: int
    graph_nodes: int
    method: str
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [layer.name for layer in self.layers]

    def to_dict(self) -> dict:
        """JSON-ready (``layers`` ranked)."""
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "all_quantized": asdict(self.all_quantized),
            "all_float": asdict(self.all_float),
            "reference_top1": self.reference_top1,
            "samples": self.samples,
            "graph_nodes": self.graph_nodes,
            "method": self.method,
            "seconds": self.seconds,
            "meta": self.meta,
        }

    def to_markdown(self) -> str:
        """The ranked table, in Markdown."""
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        pp = lambda v: "n/a" if v is None else f"{v:+.2f}"  # noqa: E731
        aq, af = self.all_quantized, self.all_float
        lines = [
            "# Per-layer sensitivity",
            "",
            f"{len(self.layers)} quantized layers, {self.samples} samples; output against the FP32 model. "
            f"All quantized: SQNR {aq.sqnr_db:.2f} dB, agreement {pct(aq.agreement)}, top-1 drop {pp(aq.drop_pp)} pp. "
            f"All float (after fold and bound): SQNR {af.sqnr_db:.2f} dB.",
            "",
            "Ranked by the output SQNR when only that layer is quantized (lowest first); the right half is the "
            "output when only that layer is kept float and everything else is quantized.",
            "",
            "| rank | layer | type | only-quantized SQNR (dB) | agreement | top-1 drop (pp) "
            "| only-float SQNR (dB) | agreement | top-1 drop (pp) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.layers:
            q, f = s.only_quantized, s.only_float
            lines.append(f"| {s.rank} | {s.name} | {s.type} | {q.sqnr_db:.2f} | {pct(q.agreement)} | {pp(q.drop_pp)} "
                         f"| {f.sqnr_db:.2f} | {pct(f.agreement)} | {pp(f.drop_pp)} |")
        lines += ["", f"Cost: {self.seconds:.2f} s ({self.method} evaluation of {self.graph_nodes}-node graph)."]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, plot: bool = True) -> list[Path]:
        """Write ``sensitivity.json``, ``sensitivity.md`` and (``plot``) ``sensitivity.png`` atomically."""
        out = Path(out_dir)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"  # +-inf as Infinity, like accuracy.json
        paths = [atomic_write_text(out / "sensitivity.json", text), atomic_write_text(out / "sensitivity.md", self.to_markdown())]
        if plot and self.layers:
            paths.append(_plot(self, out / "sensitivity.png"))
        return paths





def _plot(report: SensitivityReport, path: Path) -> Path:
    import matplotlib

    from qfold.report.stages import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    cap = lambda v: max(min(v, 80.0), -10.0)  # noqa: E731
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(layers)), 4.2))
    pos = np.arange(len(layers))
    ax.bar(pos - 0.2, [cap(s.only_quantized.sqnr_db) for s in layers], 0.4, label="only this layer quantized", color="tab:red")
    ax.bar(pos + 0.2, [cap(s.only_float.sqnr_db) for s in layers], 0.4, label="only this layer float", color="tab:blue")
    ax.axhline(cap(report.all_quantized.sqnr_db), color="k", ls="--", lw=1, label="all quantized")
    ax.set_xticks(pos, [s.name for s in layers], rotation=75, fontsize=7)
    ax.set_ylabel("model output SQNR vs FP32 (dB)")
    ax.set_title("Per-layer sensitivity (most sensitive first)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


class _Graph:
    """The fake-quant graph as an ordered node list with per-node evaluation under a precision setting."""

    def __init__(self, fq: fx.GraphModule, layers: list[str]) -> None:
        self.fq = fq
        self.nodes = list(fq.graph.nodes)
        self.modules = dict(fq.named_modules())
        self.layer_node: dict[str, fx.Node] = {}
        for n in self.nodes:
            if n.op == "call_module" and isinstance(self.modules.get(n.target), QuantLayer):
                self.layer_node.setdefault(n.target, n)
        missing = [name for name in layers if name not in self.layer_node]
        if missing:
            raise ValueError(f"layers {missing} are not quantized layers of this fake-quant model")
        self.output = next(n for n in self.nodes if n.op == "output")
        self.index = {n: i for i, n in enumerate(self.nodes)}

    def cone(self, start: fx.Node) -> list[fx.Node]:
        """``start`` and every node depending on it, in graph order."""
        seen = {start}
        stack = [start]
        while stack:
            for u in stack.pop().users:
                if u not in seen:
                    seen.add(u)
                    stack.append(u)
        return sorted(seen, key=self.index.__getitem__)

    def run(self, env: dict[fx.Node, Any], nodes: list[fx.Node], x: torch.Tensor, quantized: bool, flip: str | None) -> Any:
        """Evaluate ``nodes`` in order into ``env``; every quantizer follows ``quantized`` except layer ``flip``.

        The flipped layer gets the other precision for its weight and for its own activation input
        (its ActQuant argument is applied, or bypassed, for this reader only).
        """
        for n in nodes:
            if n.op == "placeholder":
                env[n] = x
                continue
            if n.op == "output":
                out = env[n.args[0]] if isinstance(n.args[0], fx.Node) else fx.node.map_arg(n.args[0], env.__getitem__)
                env[n] = out
                continue
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_module":
                mod = self.modules[n.target]
                if isinstance(mod, ActQuant):
                    env[n] = mod(args[0]) if quantized else args[0]
                elif isinstance(mod, QuantLayer):
                    q = quantized != (n.target == flip)
                    a0 = n.args[0]
                    if n.target == flip and isinstance(a0, fx.Node) and a0.op == "call_module" and isinstance(self.modules.get(a0.target), ActQuant):
                        src = env[a0.args[0]]
                        args = (self.modules[a0.target](src) if q else src, *args[1:])
                    env[n] = mod(*args, **kwargs) if q else mod.layer(*args, **kwargs)
                else:
                    env[n] = mod(*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "get_attr":
                obj: Any = self.fq
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            else:
                raise ValueError(f"unsupported fx node op {n.op!r} ({n.name})")
        return env[self.output]


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def _metrics(ref: np.ndarray, out: np.ndarray, y: np.ndarray | None, ref_top1: float | None) -> VariantMetrics:
    top1 = None if y is None else metrics.topk_accuracy(out, y, 1)
    drop = None if top1 is None or ref_top1 is None else 100.0 * (ref_top1 - top1)
    return VariantMetrics(metrics.sqnr_db(ref, out), metrics.top1_agreement(ref, out), top1, drop)


def layer_sensitivity(
    fq: fx.GraphModule,
    plan: QuantPlan,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    reference: nn.Module | Callable[[torch.Tensor], torch.Tensor] | np.ndarray | None = None,
    batch_size: int = 64,
    method: str = "cone",
) -> SensitivityReport:
    """Rank the quantized layers of ``fq`` by how much quantizing each alone costs at the model output.

    Args:
        fq: a calibrated fake-quant model (:func:`qfold.pipeline.calibrate_stage`); not modified.
        plan: its quantization plan (the layers measured are ``plan.layers``).
        x, y: evaluation inputs and optional integer labels (labels add top-1 and top-1 drop).
        reference: the FP32 model (or its outputs on ``x``) the outputs are compared with; default
            ``fq`` with every quantizer off (the folded, bounded float model).
        batch_size: samples per evaluation batch (memory: every node's value of one batch is kept).
        method: ``"cone"`` (re-evaluate only what depends on the layer; default) or ``"full"``
            (re-run the whole graph per variant; same numbers, for checks and benchmarks).
    """
    if method not in ("cone", "full"):
        raise ValueError(f"method must be 'cone' or 'full', got {method!r}")
    if x.shape[0] == 0:
        raise ValueError("no evaluation data for the sensitivity analysis")
    names = sorted(plan.layers)
    g = _Graph(fq, names)
    t0 = time.perf_counter()
    cones = {n: (g.cone(g.layer_node[n]) if method == "cone" else g.nodes) for n in names}
    base_f: list[np.ndarray] = []
    base_q: list[np.ndarray] = []
    outs = {(m, n): [] for m in MODES for n in names}
    refs: list[np.ndarray] = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            env_f: dict[fx.Node, Any] = {}
            env_q: dict[fx.Node, Any] = {}
            base_f.append(_first_tensor(g.run(env_f, g.nodes, xb, False, None)).double().numpy())
            base_q.append(_first_tensor(g.run(env_q, g.nodes, xb, True, None)).double().numpy())
            for n in names:
                outs[("only_quantized", n)].append(_first_tensor(g.run(dict(env_f), cones[n], xb, False, n)).double().numpy())
                outs[("only_float", n)].append(_first_tensor(g.run(dict(env_q), cones[n], xb, True, n)).double().numpy())
            if reference is not None and not isinstance(reference, np.ndarray):
                r = reference(xb)
                refs.append(_first_tensor(r).detach().double().numpy() if isinstance(r, torch.Tensor) or isinstance(r, (tuple, list)) else np.asarray(r, np.float64))
    seconds = time.perf_counter() - t0
    cat = np.concatenate
    ref = np.asarray(reference, np.float64) if isinstance(reference, np.ndarray) else cat(refs) if refs else cat(base_f)
    yy = None if y is None else np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y).reshape(-1)
    ref_top1 = None if yy is None else metrics.topk_accuracy(ref, yy, 1)
    rows = []
    for n in names:
        mq = _metrics(ref, cat(outs[("only_quantized", n)]), yy, ref_top1)
        mf = _metrics(ref, cat(outs[("only_float", n)]), yy, ref_top1)
        rows.append((n, mq, mf))
    # most sensitive first: lowest SQNR alone-quantized, then largest gain from keeping it float, then name
    rows.sort(key=lambda r: (r[1].sqnr_db, -r[2].sqnr_db, r[0]))
    layers = [LayerSensitivity(k + 1, n, plan.layers[n].type, mq, mf, len(cones[n])) for k, (n, mq, mf) in enumerate(rows)]
    return SensitivityReport(
        layers=layers,
        all_quantized=_metrics(ref, cat(base_q), yy, ref_top1),
        all_float=_metrics(ref, cat(base_f), yy, ref_top1),
        reference_top1=ref_top1,
        samples=int(x.shape[0]),
        graph_nodes=len(g.nodes),
        method=method,
        seconds=seconds,
        meta={"evaluated_nodes_per_batch": 2 * len(g.nodes) + 2 * sum(len(c) for c in cones.values())},
    )


def analyze(model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor | None, eval_y: torch.Tensor | None,
            config: Any) -> SensitivityReport:
    """Fold, bound and calibrate ``model`` as ``config`` (a :class:`qfold.config.PTQConfig`) says, then rank its layers.

    The outputs are compared with ``model`` itself on ``eval_x`` (default: the calibration inputs,
    with a warning: sensitivity measured on the data the ranges were fitted to looks better than it is).
    """
    import warnings

    from qfold import pipeline as pl

    if eval_x is None:
        warnings.warn("no evaluation data: the sensitivity is measured on the calibration inputs; pass separate evaluation data",
                      stacklevel=2)
        eval_x = calib_x
    folded, _ = pl.fold_stage(model, config, calib_x[:2])
    bounded, _ = pl.bound_stage(folded, calib_x, config)
    fq, plan, _ = pl.calibrate_stage(bounded, calib_x, config)
    bs = rows(config.eval.batch_size, model, eval_x)
    return layer_sensitivity(fq, plan, eval_x, eval_y, reference=model, batch_size=min(bs, 64))
