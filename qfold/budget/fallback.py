"""Mixed precision to an accuracy budget: keep the fewest layers float that bring the *engine's* drop within it.

``eval.fallback = "auto"`` with ``eval.max_drop_pp`` set (CLI ``qfold ptq --max-drop PP --fallback
auto``). The search:

1. ranks the quantized layers with :func:`qfold.budget.sensitivity.layer_sensitivity` on (the first
   ``RANK_SAMPLES`` of) the evaluation data, most sensitive first;
2. builds the real engine with the first ``k`` ranked layers kept float, for ``k = 0, 1, 2, 4, 8,
   ...`` (at most all layers but one) until the measured top-1 drop is within the budget, then
   bisects ``k`` between the last miss and the first hit (fewer layers);
3. tries to give each kept layer back to int8, least sensitive first, keeping every removal that
   stays within the budget.

Every step exports, builds and runs the engine exactly as the final build does (same calibration,
same backend): the measured drop is the engine's, not a proxy's. Each step records the float
layers, the drop, agreement, SQNR and the engine's batch latency. When no step meets the budget
the best one (least drop, then fewest float layers) is returned with ``met = False``; the pipeline
then builds it and exits with the budget error. On TensorRT the kept layers run in FP16
(``engine.fp16_fallback`` is switched on). Deterministic: the ranking and every decision depend only
on the inputs (ties: name order); timings are reported, never used.

The search's evaluation data must not be the calibration data: with the same data the budget would
be met on the samples the ranges were fitted to. A warning says so when they are the same.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from calib.atomic import atomic_write_text
from qfold.budget.sensitivity import SensitivityReport, layer_sensitivity
from qfold.config import PTQConfig
from qfold.inputs.rows import rows, with_rows
from qfold.report import stages as ev

TIMING_BATCH = 64
TIMING_REPEATS = 5
RANK_SAMPLES = 512  # the ranking only orders candidates; every step's drop is measured on all evaluation data


@dataclass(frozen=True)
class SearchStep:
    """One engine built and measured during the search."""

    step: int
    phase: str  # "grow", "bisect", "prune"
    float_layers: tuple[str, ...]
    drop_pp: float
    top1: float
    agreement: float
    sqnr_db: float
    latency_ms: float
    speed_vs_int8: float
    meets_budget: bool
    seconds: float


@dataclass
class FallbackResult:
    """What the search measured and chose."""

    budget_pp: float
    steps: list[SearchStep]
    chosen: int
    met: bool
    ranking: list[str]
    reasons: dict[str, str]
    sensitivity: SensitivityReport
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def float_layers(self) -> tuple[str, ...]:
        """The layers the chosen step keeps float (rank order)."""
        return self.steps[self.chosen].float_layers

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "budget_pp": self.budget_pp,
            "met": self.met,
            "chosen_step": self.chosen,
            "float_layers": list(self.float_layers),
            "reasons": dict(self.reasons),
            "ranking": list(self.ranking),
            "steps": [{**asdict(s), "float_layers": list(s.float_layers)} for s in self.steps],
            "search_seconds": self.seconds,
            "warnings": list(self.warnings),
        }

    def to_markdown(self) -> str:
        """The search, step by step, and what was kept float and why."""
        c = self.steps[self.chosen]
        lines = [
            "# Mixed-precision search (fallback = auto)",
            "",
            f"Budget: engine top-1 drop <= {self.budget_pp:.2f} pp. "
            + (f"**Met** at step {c.step}: drop {c.drop_pp:+.2f} pp with {len(c.float_layers)} layer(s) float."
               if self.met else f"**Not met**: best step {c.step}, drop {c.drop_pp:+.2f} pp with {len(c.float_layers)} layer(s) float."),
            f"Search time {self.seconds:.1f} s over {len(self.steps)} engine builds.",
            "",
        ]
        lines += [f"- warning: {w}" for w in self.warnings]
        if self.float_layers:
            lines += ["", "| kept float | why |", "|---|---|"] + [f"| {n} | {self.reasons[n]} |" for n in self.float_layers]
        lines += ["", "| step | phase | float layers | top-1 drop (pp) | agreement | SQNR (dB) | batch-64 ms | speed vs all-int8 | within budget |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in self.steps:
            names = ", ".join(s.float_layers) if len(s.float_layers) <= 4 else f"{', '.join(s.float_layers[:4])} (+{len(s.float_layers) - 4})"
            lines.append(f"| {s.step} | {s.phase} | {names or '-'} | {s.drop_pp:+.2f} | {100 * s.agreement:.2f}% | {s.sqnr_db:.2f} "
                         f"| {s.latency_ms:.2f} | {s.speed_vs_int8:.2f}x | {'yes' if s.meets_budget else 'no'} |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``fallback.json`` and ``fallback.md`` atomically."""
        out = Path(out_dir)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        return [atomic_write_text(out / "fallback.json", text), atomic_write_text(out / "fallback.md", self.to_markdown())]


def with_float_layers(config: PTQConfig, names: tuple[str, ...] | list[str]) -> PTQConfig:
    """``config`` with ``names`` (exact layer names) added to ``export.keep_float``; FP16 fallback on TensorRT."""
    keep = tuple(config.export.keep_float) + tuple(n for n in names if n not in config.export.keep_float)
    over: dict[str, dict] = {"export": {"keep_float": list(keep)}}
    if names and config.engine.backend == "tensorrt":
        over["engine"] = {"fp16_fallback": True}
    return config.replace(**over)


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    h = lambda t: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).digest()  # noqa: E731
    return h(a) == h(b)


def _latency_ms(engine: Any, x: torch.Tensor) -> float:
    xb = np.ascontiguousarray(x[:TIMING_BATCH].numpy().astype(np.float32))
    engine.run(xb)
    times = []
    for _ in range(TIMING_REPEATS):
        t = time.perf_counter()
        engine.run(xb)
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


class _Builder:
    """Builds and measures the engine of one set of float layers (memoized; work files in a temp dir)."""

    def __init__(self, bounded: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                 ref: np.ndarray, config: PTQConfig, budget: float, work: Path) -> None:
        self.bounded, self.calib_x, self.eval_x, self.eval_y, self.ref = bounded, calib_x, eval_x, eval_y, ref
        self.config, self.budget, self.work = config, budget, work
        self.steps: list[SearchStep] = []
        self.cache: dict[frozenset, SearchStep] = {}
        self.int8_ms: float | None = None

    def measure(self, names: tuple[str, ...], phase: str) -> SearchStep:
        key = frozenset(names)
        if key in self.cache:
            return self.cache[key]
        from qfold import pipeline as pl

        t0 = time.perf_counter()
        cfg = with_float_layers(self.config, names)
        fq, _, cres = pl.calibrate_stage(self.bounded, self.calib_x, cfg)
        d = self.work / f"step{len(self.steps)}"
        d.mkdir(parents=True, exist_ok=True)
        onnx_path, _ = pl.export_stage(fq, self.calib_x[:1], d, cfg, cres=cres)
        engine = pl.build_engine_stage(onnx_path, d, cfg, self.calib_x)
        out = ev.run_logits(lambda xb: engine.run(xb.numpy().astype(np.float32)), self.eval_x, cfg.eval.batch_size)
        m = ev.stage_metrics(self.ref, out, self.eval_y)
        drop = 100.0 * (ev.reference_metrics(self.ref, self.eval_y)["top1"] - m.top1)
        ms = _latency_ms(engine, self.eval_x)
        if self.int8_ms is None:
            self.int8_ms = ms
        step = SearchStep(len(self.steps), phase, tuple(names), drop, m.top1, m.agreement, m.sqnr_db, ms,
                          self.int8_ms / ms if ms > 0 else float("nan"), drop <= self.budget + 1e-9, time.perf_counter() - t0)
        self.steps.append(step)
        self.cache[key] = step
        return step


def search_fallback(
    model: nn.Module,
    bounded: nn.Module,
    calib_x: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor | None,
    config: PTQConfig,
) -> FallbackResult:
    """Find a small set of layers to keep float so the engine's top-1 drop is within ``config.eval.max_drop_pp``.

    Args:
        model: the FP32 model (the reference; never modified).
        bounded: the folded, bounded float model the pipeline quantizes.
        calib_x: calibration inputs (every step calibrates on them, as the final build does).
        eval_x, eval_y: labelled evaluation data for the search (separate from ``calib_x``).
        config: the run's configuration (its ``export.keep_float`` patterns stay float throughout).

    Raises:
        ValueError: no budget, or no labels (the budget is a top-1 drop).
    """
    from qfold import pipeline as pl

    budget = config.eval.max_drop_pp
    if budget is None:
        raise ValueError("fallback = 'auto' needs an accuracy budget: set eval.max_drop_pp (CLI --max-drop PP)")
    if eval_y is None:
        raise ValueError("fallback = 'auto' needs labelled evaluation data (the budget is a top-1 drop); pass labels "
                         "with the evaluation data (--eval-data with 'y')")
    config = with_rows(config, model, calib_x, eval_x)
    t0 = time.perf_counter()
    notes: list[str] = []
    if _same_data(calib_x, eval_x):
        notes.append("the search's evaluation data is the calibration data; the drop it meets is measured on the samples "
                     "the ranges were fitted to - pass separate evaluation data (--eval-data)")
        warnings.warn(notes[-1], stacklevel=2)
    bs = config.eval.batch_size
    ref = ev.run_logits(model, eval_x, bs)
    fq, plan, _ = pl.calibrate_stage(bounded, calib_x, config)
    n = min(RANK_SAMPLES, eval_x.shape[0])
    sens = layer_sensitivity(fq, plan, eval_x[:n], eval_y[:n], reference=ref[:n], batch_size=min(bs, 64))
    ranking = sens.ranking()
    by_name = {s.name: s for s in sens.layers}
    with tempfile.TemporaryDirectory(prefix="qfold-fallback-") as tmp:
        b = _Builder(bounded, calib_x, eval_x, eval_y, ref, config, budget, Path(tmp))
        prefix = lambda k: tuple(ranking[:k])  # noqa: E731
        hit = None
        miss = 0
        k = 0
        limit = len(ranking) - 1  # at least one layer stays int8 (an all-float model is not a quantized build)
        while True:
            if b.measure(prefix(k), "grow").meets_budget:
                hit = k
                break
            miss = k
            if k >= limit:
                break
            k = min(limit, max(1, 2 * k))
        if hit is not None:
            lo, hi = miss, hit  # prefix(lo) misses (or lo == hi == 0), prefix(hi) meets
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if b.measure(prefix(mid), "bisect").meets_budget:
                    hi = mid
                else:
                    lo = mid
            kept = list(prefix(hi))
            for name in reversed(prefix(hi)):  # least sensitive first
                trial = tuple(n for n in kept if n != name)
                if b.measure(trial, "prune").meets_budget:
                    kept = list(trial)
            chosen = b.cache[frozenset(kept)]
        else:
            chosen = min(b.steps, key=lambda s: (s.drop_pp, len(s.float_layers), s.step))
        steps = list(b.steps)
    reasons = {}
    for n in chosen.float_layers:
        s = by_name[n]
        reasons[n] = (f"sensitivity rank {s.rank} of {len(ranking)}: {s.only_quantized.sqnr_db:.1f} dB output SQNR when only it is "
                      f"int8; keeping only it float gives {s.only_float.sqnr_db:.1f} dB (all int8: {sens.all_quantized.sqnr_db:.1f} dB)")
    return FallbackResult(budget, steps, chosen.step, chosen.meets_budget, ranking, reasons, sens,
                          time.perf_counter() - t0, notes)


def write_artifacts(result: FallbackResult, config: PTQConfig, out_dir: str | Path) -> list[Path]:
    """``fallback.json``/``.md``, the search's ``sensitivity.*`` and ``config.fallback.toml``.

    ``config.fallback.toml`` is the configuration the final build used (the search's float layers in
    ``export.keep_float``, ``eval.fallback = "off"``): ``qfold ptq --config`` with it rebuilds the
    same engine without searching again.
    """
    from qfold.config import to_toml

    out = Path(out_dir)
    paths = result.save(out) + result.sensitivity.save(out, plot=config.eval.plots)
    final = with_float_layers(config, result.float_layers).replace(eval={"fallback": "off"})
    paths.append(atomic_write_text(out / "config.fallback.toml", to_toml(final)))
    return paths


def budget_artifacts(fallback: FallbackResult | None, res: Any, config: PTQConfig, out_dir: Path, eval_x: torch.Tensor,
                     eval_y: torch.Tensor | None, model: nn.Module) -> list[Path]:
    """The budget files of a PTQ run: the search's (``fallback``) or, with ``eval.sensitivity``, the table.

    ``res`` is the run's :class:`qfold.pipeline.PTQResult`; its ``reports["fallback"]`` gets the
    search's summary.
    """
    if fallback is not None:
        res.reports["fallback"] = {k: v for k, v in fallback.to_dict().items() if k != "steps"}
        return write_artifacts(fallback, config, out_dir)
    if not config.eval.sensitivity:
        return []
    sens = layer_sensitivity(res.fake_quant, res.plan, eval_x, eval_y, reference=model,
                             batch_size=min(rows(config.eval.batch_size, model, eval_x), 64))
    return sens.save(out_dir, plot=config.eval.plots)


def plan_fallback(model: nn.Module, bounded: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor,
                  eval_y: torch.Tensor | None, config: PTQConfig) -> tuple[FallbackResult | None, PTQConfig]:
    """With ``eval.fallback = "auto"``: the search's result and ``config`` with its float layers; else ``(None, config)``."""
    if config.eval.fallback != "auto":
        return None, config
    result = search_fallback(model, bounded, calib_x, eval_x, eval_y, config)
    return result, with_float_layers(config, result.float_layers)
