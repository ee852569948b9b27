"""What the bound did at each ReLU site, and what it cost on the data (:func:`qfold.bound.bound_relu`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qfold.bound.formulas import RELU6_CAP

__all__ = ["BoundReport", "SiteReport"]


@dataclass(frozen=True)
class SiteReport:
    """One ReLU site after bounding.

    Attributes:
        name: the site's node name in the traced graph of the input model.
        target: the module qualname or function it called.
        mode: "preserve" (rescaled, function kept up to the cap) or "swap" (literal ReLU6).
        reason: why a site fell back to "swap" ("" otherwise).
        group: sites with the same group share one per-channel scale (a residual stream).
        caps: per-channel cap in the original units (``6/s_c``); ``(6.0,)`` for a swapped site.
        above6_fp32: fraction of the unbounded model's pre-activations above 6 at this site.
        clipped: fraction of the bounded model's ReLU6 inputs above 6 (values changed by the cap).
    """

    name: str
    target: str
    mode: str
    reason: str = ""
    group: int | None = None
    caps: tuple[float, ...] = (RELU6_CAP,)
    above6_fp32: float | None = None
    clipped: float | None = None


@dataclass(frozen=True)
class BoundReport:
    """What ``bound_relu`` did, and what it cost on the data given (None without data)."""

    mode: str
    quantile: float
    sites: tuple[SiteReport, ...]
    already_bounded: tuple[str, ...]
    samples: int
    output_sqnr_db: float | None
    top1_agreement: float | None

    @property
    def preserved(self) -> int:
        return sum(s.mode == "preserve" for s in self.sites)

    @property
    def swapped(self) -> int:
        return sum(s.mode == "swap" for s in self.sites)

    def to_dict(self) -> dict:
        """JSON-ready plain types (``caps`` as lists; an SQNR of identical outputs stays ``inf``)."""
        d = asdict(self)
        d["sites"] = [{**site, "caps": list(site["caps"])} for site in d["sites"]]
        d["already_bounded"] = list(self.already_bounded)
        return d

    def __str__(self) -> str:
        return self.to_markdown()

    def to_markdown(self) -> str:
        """A markdown table, one row per site, then the model-level numbers."""
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.3f}%"

        rows = ["| site | target | mode | group | cap min..max | >6 in FP32 | clipped by ReLU6 | note |", "|---|---|---|---|---|---|---|---|"]
        for s in self.sites:
            cap = f"{min(s.caps):.3g}..{max(s.caps):.3g}"
            rows.append(f"| {s.name} | {s.target} | {s.mode} | {'-' if s.group is None else s.group} | {cap} | {pct(s.above6_fp32)} | {pct(s.clipped)} | {s.reason} |")
        sq = "-" if self.output_sqnr_db is None else f"{self.output_sqnr_db:.2f} dB"
        rows.append(f"\nmode {self.mode}, quantile {self.quantile}, {self.samples} samples: output SQNR {sq}, top-1 agreement {pct(self.top1_agreement)}")
        return "\n".join(rows)
