"""Bound activations: every ReLU becomes a ReLU6, by default without changing the function.

``bound_relu(model, calib_data)`` traces a copy of ``model``, finds every ReLU site (``nn.ReLU``,
``F.relu``, ``torch.relu``, ``Tensor.relu``, their in-place forms) and rewrites each into a
``call_module`` ``nn.ReLU6`` (existing ``F.relu6`` / ``F.hardtanh(x, 0, 6)`` / ``Hardtanh(0, 6)`` are
normalized the same way). In ``"preserve"`` mode the conv/linear layers writing into each ReLU
are rescaled per channel by ``s_c = 6/q_c`` and the layers reading from it by ``1/s_c`` (see
:mod:`qfold.bound.formulas`), so the ReLU6 cap sits at the ``quantile`` ``q_c`` of the real
activations and the network computes what it did before, up to that clipping.

Which tensors share a scale is found by a union-find over the graph: a ReLU site joins its input
and output, ops that commute with a positive per-channel scale (pooling, dropout, zero padding,
interpolation, spatial reductions) join their input and output, an ``add`` joins both inputs and
its output (a residual stream gets one shared scale). A group is *feasible* when every tensor in
it is written by a conv/linear (which absorbs ``s``) or by a joined op, and every reader is a
joined op, a conv/linear input (which absorbs ``1/s``), or a flatten/concat whose readers are.
Anything else (a model output, a non-linearity, a shared module, a model input feeding the
stream) makes that group fall back to the literal swap, and the report says why.

BatchNorm: one that ``qfold.fold_batchnorm`` would fold (right after a conv/linear feeding only it)
next to a group is an error: fold first. One that cannot be folded (after a concat or a pool, as
in pre-activation DenseNets) writing into a group absorbs ``s`` in its gamma and beta (exact);
one reading from a group cannot absorb ``1/s`` (``eps`` is not per channel), so that group falls back.

The graph classification and planning (site detection, union-find of channel groups, producers and
consumers) are :mod:`qfold.bound.sites`; this module applies the plan.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn

from qfold.bound import formulas as bm
from qfold.bound.report import BoundReport, SiteReport
from qfold.bound.sites import (
    _bounded_site,
    _data,
    _plan,
)
from qfold.capture import trace
from qfold.config import BoundConfig
from qfold.errors import BoundError
from qfold.fx import (
    BATCH_NORM,
    CONV_TRANSPOSE,
    eval_mode,
    fn_name,
    relu_site,
    set_module,
    tensor_leaves,
)
from qfold.report.metrics import sqnr_db_from_energy

# ---------------------------------------------------------------- data passes


class _Watch(fx.Interpreter):
    """Runs a GraphModule node by node, handing each watched node's input to a callback."""

    def __init__(self, gm: fx.GraphModule, watch: dict, shapes: dict | None = None) -> None:
        super().__init__(gm)
        self.watch, self.shapes = watch, shapes

    def run_node(self, n: fx.Node):
        if n.name in self.watch:
            self.watch[n.name](self.env[_data(n)])  # before an in-place op overwrites it
        out = super().run_node(n)
        if self.shapes is not None:
            self.shapes[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.ndim < 1 or data.shape[0] == 0:
            raise BoundError(f"calib_data tensor must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    if iter(data) is data:
        raise BoundError("calib_data is a one-shot iterator, but bound_relu reads it twice (statistics, then the report); pass a tensor, a list of tensors or a DataLoader")
    first = None
    for n, b in enumerate(data):
        if not isinstance(b, torch.Tensor):
            raise BoundError(f"calib_data must yield input tensors, got {type(b).__name__}; for (input, label) pairs pass [x for x, _ in loader]")
        if first is None:
            first = tuple(b.shape[1:])
        elif tuple(b.shape[1:]) != first:
            raise BoundError(f"calib_data batch {n} has shape {tuple(b.shape)}, earlier batches (N, {', '.join(map(str, first))}); all batches must share one input shape")
        yield b
    if first is None:
        raise BoundError("calib_data is empty; pass at least one batch")


def _first(batches: Iterator[torch.Tensor], samples: int) -> Iterator[torch.Tensor]:
    """The leading whole batches holding at least ``samples`` rows (all of them for 0); the
    statistics need ``bound.values`` values per channel, so a site's smallest map sets the rows."""
    rows = 0
    for b in batches:
        if samples and rows >= samples:
            return
        rows += b.shape[0]
        yield b


def _shapes(gm: fx.GraphModule, batch: torch.Tensor) -> dict[str, tuple | None]:
    """Every node's output shape, from the first two rows of ``batch`` (enough to tell N from C)."""
    shapes: dict[str, tuple | None] = {}
    try:
        _Watch(gm, {}, shapes).run(batch[:2])
    except Exception as exc:
        raise BoundError(
            f"calib_data batch of shape {tuple(batch.shape)} does not fit the model ({type(exc).__name__}: {exc}); "
            "pass batches shaped like the model's input, e.g. (N, C, H, W)"
        ) from exc
    return shapes


# ---------------------------------------------------------------- the pass


def rewrite_to_relu6(gm: fx.GraphModule, names: dict[str, bool]) -> dict[str, str]:
    """Every node in ``names`` (name -> in place) becomes a call to an ``nn.ReLU6`` submodule."""
    nodes = {n.name: n for n in gm.graph.nodes}
    new_names, k = {}, 0
    for name, inplace in names.items():
        n = nodes[name]
        if n.op == "call_module":
            if type(gm.get_submodule(n.target)) is not nn.ReLU6:
                set_module(gm, n.target, nn.ReLU6(inplace=inplace))
            new_names[name] = name
            continue
        while hasattr(gm, f"relu6_{k}"):
            k += 1
        gm.add_submodule(f"relu6_{k}", nn.ReLU6(inplace=inplace))
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(f"relu6_{k}", (_data(n),))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        new_names[name] = new.name
    gm.graph.lint()
    gm.recompile()
    return new_names


def bound_relu(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[torch.Tensor] | None = None,
    *,
    mode: str = "preserve",
    quantile: float = 0.9999,
    config: BoundConfig | None = None,
    batch_size: int = 256,
) -> tuple[fx.GraphModule, BoundReport]:
    """Replace every ReLU of ``model`` with ReLU6 and say what that cost.

    Args:
        model: an FP32 model, BatchNorms already folded (``qfold.fold_batchnorm``); not modified.
        calib_data: input batches (an iterable of tensors that can be read twice, or one tensor,
            split into ``batch_size`` rows). Required for "preserve"; with "swap" it only
            feeds the report.
        mode, quantile: shorthands for ``BoundConfig(mode=..., quantile=...)``.
        config: the full configuration; do not combine with non-default ``mode``/``quantile``.

    Returns:
        ``(bounded, report)``: a new GraphModule whose ReLU sites are ``nn.ReLU6`` modules (and
        whose conv/linear weights are rescaled in "preserve" mode), and a :class:`BoundReport`.

    Raises:
        BoundError: "preserve" without data; data of the wrong shape or type; a BatchNorm where
            the rescale would need it folded.
    """
    if config is None:
        config = BoundConfig(mode=mode, quantile=quantile)
    elif (mode, quantile) != ("preserve", 0.9999) and (mode, quantile) != (config.mode, config.quantile):
        raise BoundError("pass either config=BoundConfig(...) or mode/quantile, not both")
    if config.mode == "off":
        raise BoundError("mode='off' means no bound: use the model as it is (the pipeline skips this step), or pass mode='preserve' or 'swap'")
    bgm, pending = _bound_relu(model, calib_data, config, defer=False, batch_size=batch_size)
    return bgm, pending.report()


def bound_relu_deferred(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[torch.Tensor] | None = None,
    *,
    config: BoundConfig = BoundConfig(),
    batch_size: int = 256,
) -> tuple[fx.GraphModule, "PendingReport"]:
    """:func:`bound_relu`, leaving the bounded model's pass over ``calib_data`` to the caller.

    The report's clipping counts, output SQNR and top-1 agreement need the bounded model's outputs
    on the data. A caller that runs the bounded model over the same batches anyway (calibration
    runs it with its quantizers off) runs it inside ``pending.observe(model)`` and then reads
    ``pending.report()``: the same numbers as :func:`bound_relu`'s, one pass over the data fewer.
    Where the report needs no bounded pass (no ReLU site, or the unbounded model's outputs were too
    large to keep), ``pending`` is already complete and ``observe`` watches nothing.
    """
    if config.mode == "off":
        raise BoundError("mode='off' means no bound: use the model as it is (the pipeline skips this step)")
    return _bound_relu(model, calib_data, config, defer=True, batch_size=batch_size)


def _bound_relu(model: nn.Module, calib_data: torch.Tensor | Iterable[torch.Tensor] | None, config: BoundConfig,
                defer: bool, batch_size: int) -> tuple[fx.GraphModule, "PendingReport"]:
    if config.mode == "preserve" and calib_data is None:
        raise BoundError("mode='preserve' needs calib_data (a few hundred representative inputs) to place the caps; pass it, or use mode='swap' for the literal ReLU -> ReLU6 replacement")
    first = next(iter(_batches(calib_data, batch_size)), None) if calib_data is not None else None
    gm = trace(model, example_inputs=first)  # torch.export capture on the first batch if fx cannot trace
    graph_nodes = list(gm.graph.nodes)
    sites = {n.name: ip for n in graph_nodes if (ip := relu_site(gm, n)) is not None}
    bounded = {n.name: ip for n in graph_nodes if (ip := _bounded_site(gm, n)) is not None}
    target = {n.name: n.target if n.op == "call_module" else fn_name(n.target) for n in graph_nodes}
    rows, shapes = 0, {}  # rows 0: all of them, unless bound.values says fewer suffice
    if calib_data is not None and config.mode == "preserve" and sites:
        with eval_mode(gm):
            shapes = _shapes(gm, first)
        if config.values:  # (N, C, *spatial): the smallest map sets the rows
            rows = math.ceil(config.values / min(math.prod(shapes[s][2:]) for s in sites))
    batches = (lambda: _first(_batches(calib_data, batch_size), rows)) if calib_data is not None else None

    scales: dict[int, torch.Tensor] = {}
    groups, group_of, consumers = [], {}, {}
    fp32 = _Reference(sites) if batches is not None else None
    if config.mode == "preserve" and sites:
        with eval_mode(gm):
            groups, group_of, consumers = _plan(gm, shapes, list(sites))
            live = [s for s in sites if not groups[group_of[s]].reason]
            hists = {s: bm.hist_empty(shapes[s][1], config.bins) for s in live}
            counted = dict.fromkeys(hists, 0)  # rows in each histogram: exactly `rows` (all for 0), whatever the batch size

            def updater(s: str):
                count = fp32.counter(s)

                def upd(x: torch.Tensor) -> None:
                    count(x)
                    if s in hists:
                        take = x if not rows else x[: max(0, rows - counted[s])]
                        counted[s] += take.shape[0]
                        if take.shape[0]:
                            hists[s] = bm.hist_update(hists[s], take.detach(), axis=1)
                return upd

            # one pass of the unbounded model: the caps' histograms, and what the report needs from it
            watch = {s: updater(s) for s in sites}
            for x in batches():
                fp32.add_outputs(_Watch(gm, watch).run(x))
        for g, grp in enumerate(groups):
            if not grp.reason:
                q = torch.stack([bm.hist_quantile(hists[s], config.quantile) for s in grp.sites]).amax(dim=0)
                scales[g] = bm.relu6_scales(q, max_scale=config.max_scale)

    bgm = copy.deepcopy(gm)
    todo: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"out_scale": s, "in_scale": s}, applied once
    for g, s in scales.items():
        for p in groups[g].producers:
            todo.setdefault(p, {})["out_scale"] = s
    for c, segs in consumers.items():
        if any(g in scales for g, _ in segs):
            parts = [scales[g][idx] if g in scales else torch.ones(len(idx), dtype=torch.float64) for g, idx in segs]
            todo.setdefault(c, {})["in_scale"] = torch.cat(parts)
    for name, kw in todo.items():
        _rescale(bgm.get_submodule(name), **kw)
    new_names = rewrite_to_relu6(bgm, {**sites, **bounded})

    def make_report(above: dict, clipped: dict, samples: int, sqnr: float | None, agree: float | None) -> BoundReport:
        reports = []
        for s in sites:
            g = group_of.get(s)
            preserved = g is not None and g in scales
            reason = "" if preserved or config.mode == "swap" else (groups[g].reason if g is not None else "")
            caps = tuple((bm.RELU6_CAP / scales[g]).tolist()) if preserved else (bm.RELU6_CAP,)
            reports.append(SiteReport(s, str(target[s]), "preserve" if preserved else "swap", reason, g if preserved else None, caps, above.get(s), clipped.get(s)))
        return BoundReport(config.mode, config.quantile, tuple(reports), tuple(bounded), samples, sqnr, agree)

    if batches is None:
        return bgm, PendingReport(make_report({}, {}, 0, None, None))
    if defer and sites and fp32.outputs:  # the caller's pass of the bounded model completes the report
        return bgm, PendingReport(None, make_report, fp32, _site_calls(bgm, new_names), partial=rows > 0)
    return bgm, PendingReport(make_report(*_measure(gm, bgm, batches, sites, new_names, fp32 if fp32.outputs else None)))


def _rescale(m: nn.Module, *, out_scale: torch.Tensor | None = None, in_scale: torch.Tensor | None = None) -> None:
    if isinstance(m, BATCH_NORM):  # a producer only: gamma and beta times s
        with torch.no_grad():
            for p in (m.weight, m.bias):
                p.copy_((p.detach().double() * out_scale).to(p.dtype))
        return
    transposed = isinstance(m, CONV_TRANSPOSE)
    w, b = bm.rescale_weight(m.weight, m.bias, out_scale=out_scale, in_scale=in_scale, groups=getattr(m, "groups", 1), transposed=transposed)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)


class _Reference:
    """What the report needs from the unbounded model, gathered during the statistics pass.

    Per site the count of pre-activations above 6 and of all values; the model's outputs per
    batch, so the bounded model's pass compares against them instead of running the unbounded
    model a second time. Outputs are kept up to ``keep_bytes`` in all (logits are a few KiB per
    sample); past that (dense outputs) they are dropped and the report re-runs the model.
    """

    def __init__(self, sites: dict[str, bool], keep_bytes: int = 256 << 20) -> None:
        self.over = dict.fromkeys(sites, 0)
        self.total = dict.fromkeys(sites, 0)
        self.outputs: list[list[torch.Tensor]] | None = []
        self.keep_bytes = keep_bytes

    def counter(self, s: str):
        def fn(x: torch.Tensor) -> None:
            self.over[s] += int(torch.count_nonzero(x > bm.RELU6_CAP))
            self.total[s] += x.numel()
        return fn

    def add_outputs(self, out: object) -> None:
        if self.outputs is None:
            return
        self.outputs.append(tensor_leaves(out))
        self.keep_bytes -= sum(t.numel() * t.element_size() for t in self.outputs[-1])
        if self.keep_bytes < 0:
            self.outputs = None


def _measure(gm, bgm, batches, sites, new_names, fp32: _Reference | None = None):
    """Stream the data through both models: fraction > 6 per site, output SQNR, top-1 agreement.

    With ``fp32`` (gathered by the statistics pass over the same batches) only the bounded
    model runs here.
    """
    clip = dict.fromkeys(sites, 0)

    def count_clip(s: str):
        def fn(x: torch.Tensor) -> None:
            clip[s] += int(torch.count_nonzero(x > bm.RELU6_CAP))
        return fn

    if not sites:  # nothing rewritten but existing ReLU6 forms: the same function, exactly
        return _measure_unchanged(gm, batches)
    ref_pass = fp32 is None
    if ref_pass:
        fp32 = _Reference(sites)
    ref_watch = {s: fp32.counter(s) for s in sites}
    b_watch = {new_names[s]: count_clip(s) for s in sites}
    cmp = _Compare()
    with eval_mode(gm, bgm):
        for i, x in enumerate(batches()):
            if i == 0 and ref_pass:
                _shapes(gm, x)  # a clear error for data of the wrong shape
            if ref_pass:
                fp32.add_outputs(_Watch(gm, ref_watch).run(x))
            elif i >= len(fp32.outputs):
                raise BoundError("calib_data yielded more batches on the second read than on the first; pass data that reads the same every time")
            cmp.add(fp32.outputs[i], _Watch(bgm, b_watch).run(x), x.shape[0])
            if ref_pass:
                fp32.outputs[i] = []  # streamed: one batch of outputs at a time
    return cmp.result(fp32, clip, sites)


class _Compare:
    """Streams the unbounded vs bounded model's outputs, batch by batch: energies and top-1 agreement."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.same = self.rows = self.samples = self.batches = 0
        self.top1 = True

    def add(self, ref: list[torch.Tensor], out: object, samples: int) -> None:
        out = tensor_leaves(out)
        self.samples += samples
        self.batches += 1
        for r, o in zip(ref, out):
            r, o = r.double(), o.double()
            self.signal += float((r * r).sum())
            self.noise += float(((r - o) ** 2).sum())
        self.top1 = self.top1 and bool(ref) and ref[0].ndim == 2
        if self.top1:
            self.same += int((ref[0].argmax(dim=1) == out[0].argmax(dim=1)).sum())
            self.rows += ref[0].shape[0]

    def result(self, fp32: "_Reference", clip: dict[str, int], sites: Iterable[str]):
        total = fp32.total
        above = {s: fp32.over[s] / total[s] if total[s] else 0.0 for s in sites}
        clipped = {s: clip[s] / total[s] if total[s] else 0.0 for s in sites}
        agree = self.same / self.rows if self.top1 and self.rows else None
        return above, clipped, self.samples, sqnr_db_from_energy(self.signal, self.noise), agree


def _site_calls(bgm: fx.GraphModule, new_names: dict[str, str]) -> dict[str, list[str]]:
    """ReLU6 module qualname -> the sites calling it, in graph order (a shared module runs once per site)."""
    site_of = {v: k for k, v in new_names.items()}
    calls: dict[str, list[str]] = {}
    for n in bgm.graph.nodes:
        if n.op == "call_module" and n.name in site_of:
            calls.setdefault(n.target, []).append(site_of[n.name])
    return calls


class PendingReport:
    """A :class:`BoundReport`, complete, or waiting for one pass of the bounded model (:func:`bound_relu_deferred`).

    ``observe(model)`` hooks ``model`` (the bounded GraphModule, or a copy with the same ReLU6
    modules in the same graph order, such as its fake-quant model with quantizers off) while the
    block runs; every forward of ``model`` inside it must be one calibration batch, in the order
    the statistics pass saw them (with ``bound.values`` it saw the leading batches: later ones
    are calibrated but not compared). ``report()`` then gives the report.
    """

    def __init__(self, done: BoundReport | None, make=None, fp32: "_Reference | None" = None,
                 calls: dict[str, list[str]] | None = None, partial: bool = False) -> None:
        self._done, self._make, self._fp32, self._calls = done, make, fp32, calls or {}
        self._partial = partial  # the statistics saw the leading batches only; later ones are not compared
        self._cmp = _Compare()
        self._clip = dict.fromkeys(fp32.total if fp32 is not None else (), 0)

    @property
    def complete(self) -> bool:
        return self._done is not None

    @contextmanager
    def observe(self, model: nn.Module) -> Iterator[None]:
        """Watch ``model``'s ReLU6 inputs and outputs while the block runs (nothing when complete)."""
        if self._done is not None:
            yield
            return
        modules = dict(model.named_modules())
        missing = [t for t in self._calls if not isinstance(modules.get(t), nn.ReLU6)]
        if missing:
            raise BoundError(f"the model to observe lacks the bounded model's ReLU6 modules {missing[:3]}; pass the bounded model or its fake-quant copy")
        seen = dict.fromkeys(self._calls, 0)
        fp32, clip = self._fp32, self._clip
        active = [True]  # this batch is one the statistics pass saw (bound.values: the leading ones)

        def start(_m: nn.Module, _args: tuple) -> None:
            active[0] = self._cmp.batches < len(fp32.outputs) or not self._partial
            for t in seen:
                seen[t] = 0

        def count(t: str):
            sites = self._calls[t]

            def pre(_m: nn.Module, args: tuple) -> None:
                if not active[0]:
                    return
                k = seen[t]
                if k >= len(sites):
                    raise BoundError(f"module {t} ran more often than the bounded graph calls it; observe the bounded model itself")
                seen[t] = k + 1
                clip[sites[k]] += int(torch.count_nonzero(args[0] > bm.RELU6_CAP))
            return pre

        def end(_m: nn.Module, args: tuple, out: object) -> None:
            if not active[0]:
                return
            i = self._cmp.batches
            if i >= len(fp32.outputs):
                raise BoundError("the observed model ran more batches than the statistics pass saw; run it over the same calibration batches")
            self._cmp.add(fp32.outputs[i], out, args[0].shape[0])
            fp32.outputs[i] = []  # streamed: one batch of outputs at a time

        handles = [model.register_forward_pre_hook(start), model.register_forward_hook(end)]
        handles += [modules[t].register_forward_pre_hook(count(t)) for t in self._calls]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def report(self) -> BoundReport:
        """The report; raises BoundError when the bounded pass has not run over every batch."""
        if self._done is None:
            if self._cmp.batches != len(self._fp32.outputs):
                raise BoundError(f"the bounded model ran over {self._cmp.batches} batches, the statistics pass over "
                                 f"{len(self._fp32.outputs)}; run it inside observe() over the same calibration batches")
            self._done = self._make(*self._cmp.result(self._fp32, self._clip, self._fp32.total))
            self._fp32 = None
        return self._done


def _measure_unchanged(gm, batches):
    """The report of a model without ReLU sites: the bounded model only normalizes existing
    ReLU6 / Hardtanh(0, 6) calls to ``nn.ReLU6``, which computes the same values, so the output
    SQNR is +inf and the top-1 agreement 1 (for (N, classes) outputs) without running both models."""
    samples, top1 = 0, None
    with eval_mode(gm):
        for i, x in enumerate(batches()):
            if i == 0:
                _shapes(gm, x)  # a clear error for data of the wrong shape
                out = tensor_leaves(_Watch(gm, {}).run(x[:1]))
                top1 = 1.0 if out and out[0].ndim == 2 else None
            samples += x.shape[0]
    return {}, {}, samples, sqnr_db_from_energy(1.0, 0.0), top1
