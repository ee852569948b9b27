"""What :func:`qfold.fold.fold_batchnorm` did with every BatchNorm it found.

One :class:`FoldEntry` per BatchNorm call site, in graph order: folded (into which layer, in
which direction) or left (and why). The report prints as a fixed-width table and serialises to
JSON with stable keys, so the CLI can print it and CI can diff it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["folded", "left"]
Direction = Literal["after", "before"]


@dataclass(frozen=True)
class FoldEntry:
    """The fate of one BatchNorm.

    Attributes:
        bn: qualified name of the BatchNorm module (or of the module owning the buffers of an
            ``F.batch_norm`` call).
        kind: the BatchNorm's type name (``BatchNorm2d``, ``SyncBatchNorm``, ``FrozenBatchNorm2d``,
            ``F.batch_norm``...).
        status: ``"folded"`` or ``"left"``.
        into: qualified name of the layer that absorbed it, None when left.
        direction: ``"after"`` when the BN followed the layer (``bn(conv(x))``), ``"before"`` when
            it preceded it (``conv(bn(x))``), None when left.
        reason: why it was left ("" when folded).
        note: an assumption the fold relied on, if any ("" otherwise).
    """

    bn: str
    kind: str
    status: Status
    into: str | None = None
    direction: Direction | None = None
    reason: str = ""
    note: str = ""


@dataclass(frozen=True)
class FoldReport:
    """Every BatchNorm found by a fold, in graph order."""

    entries: tuple[FoldEntry, ...] = field(default_factory=tuple)
    capture: str = "torch.fx"  # how the graph was captured: "torch.fx" or "torch.export"
    valid_for: str = "any input the model accepts"  # the input shapes the folded graph is valid for

    @property
    def folded(self) -> list[FoldEntry]:
        """The entries that were folded."""
        return [e for e in self.entries if e.status == "folded"]

    @property
    def left(self) -> list[FoldEntry]:
        """The entries that were left in the model, each with its reason."""
        return [e for e in self.entries if e.status == "left"]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form: ``{"folded": n, "left": n, "entries": [{bn, kind, status, into, direction, reason, note}]}``."""
        return {
            "folded": len(self.folded),
            "left": len(self.left),
            "entries": [asdict(e) for e in self.entries],
            "capture": {"method": self.capture, "valid_for": self.valid_for},
        }

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict` (sorted keys, two-space indent, trailing newline)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    def __str__(self) -> str:
        head = ("bn", "kind", "status", "into", "dir", "reason / note")
        rows = [
            (e.bn, e.kind, e.status, e.into or "-", e.direction or "-", e.reason or e.note or "")
            for e in self.entries
        ]
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
        lines = [f"BatchNorm folding: {len(self.folded)} folded, {len(self.left)} left"]
        if self.capture != "torch.fx":
            lines.append(f"captured with {self.capture}: valid for {self.valid_for}")
        for r in [head, *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
        return "\n".join(line.rstrip() for line in lines)
