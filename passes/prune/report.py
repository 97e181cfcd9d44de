"""What pruning did, per channel group and in total: for people (a rich table) and machines (a dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.console import Group
from rich.table import Table

from .reconstruct import RefitResult
from .renorm import MIN_VALUES, RenormResult


@dataclass
class GroupReport:
    """One channel group: its channels (atoms x elements per atom) and the cost of the layers it touches."""

    id: int
    name: str
    status: str  # "pruned", "kept", "blocked", or "removed" (every channel: a whole residual branch went)
    atoms_before: int
    atoms_after: int
    width: float  # elements per atom in the first producer's output (32 for a head of 32 dims)
    macs_before: float
    macs_after: float
    params_before: float
    params_after: float
    layers: list[str] = field(default_factory=list)
    blocked_by: list[dict[str, str]] = field(default_factory=list)

    @property
    def channels_before(self) -> int:
        return int(round(self.atoms_before * self.width))

    @property
    def channels_after(self) -> int:
        return int(round(self.atoms_after * self.width))


@dataclass
class PruneReport:
    macs_before: float
    macs_after: float
    params_before: float
    params_after: float
    ratio: float  # the uniform per-group ratio, or (``uniform`` False) the fraction of prunable atoms removed
    target: str
    criterion: str
    groups: list[GroupReport] = field(default_factory=list)
    refits: list[RefitResult] = field(default_factory=list)
    reconstructed: bool = False
    calibration_samples: int = 0
    output_sqnr_db: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    renorms: list[RenormResult] = field(default_factory=list)  # BN statistics re-estimated, per layer
    uniform: bool = True  # one ratio for every group (False: per-group counts, --allocate latency)

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["macs_kept"] = self.macs_kept
        for group, row in zip(self.groups, data["groups"], strict=True):
            row["channels_before"], row["channels_after"] = group.channels_before, group.channels_after
        return data


def _num(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _channels(atoms: int, width: float) -> str:
    if abs(width - 1.0) < 1e-9:
        return str(atoms)
    return f"{int(round(atoms * width))} ({atoms}x{width:g})"


def render(report: PruneReport) -> Group:
    """The per-group table and a totals table."""
    table = Table("group", "layers", "channels", "MACs", "params", "status", title="channel groups")
    for g in report.groups:
        status = g.status if not g.blocked_by else "blocked: " + "; ".join(
            f"{b['node']}: {b['reason']}" for b in g.blocked_by[:2]) + (" ..." if len(g.blocked_by) > 2 else "")
        table.add_row(str(g.id), g.name, f"{_channels(g.atoms_before, g.width)} -> {_channels(g.atoms_after, g.width)}",
                      f"{_num(g.macs_before)} -> {_num(g.macs_after)}", f"{_num(g.params_before)} -> "
                      f"{_num(g.params_after)}", status)
    totals = Table(show_header=False, title="model")
    totals.add_row("MACs", f"{_num(report.macs_before)} -> {_num(report.macs_after)} "
                           f"({100 * report.macs_kept:.1f}% kept)")
    totals.add_row("params", f"{_num(report.params_before)} -> {_num(report.params_after)} "
                             f"({100 * report.params_after / max(report.params_before, 1):.1f}% kept)")
    kind = "uniform ratio" if report.uniform else "atoms removed"
    totals.add_row("target", f"{report.target} ({kind} {report.ratio:.3f}, criterion {report.criterion})")
    if report.reconstructed:
        improved = sum(r.error_after < r.error_before for r in report.refits)
        totals.add_row("reconstruction", f"{improved}/{len(report.refits)} layers refit on "
                                         f"{report.calibration_samples} calibration samples")
    if applied := [r for r in report.renorms if r.applied]:
        bn = sum(r.kind == "batchnorm" for r in applied)
        worst = max(applied, key=lambda r: r.mean_shift)
        totals.add_row("BN statistics", f"re-estimated for {bn} BatchNorm and {len(applied) - bn} folded "
                                        f"layers; largest mean shift {worst.mean_shift:.2f} std ({worst.node})")
    if left := [r for r in report.renorms if not r.applied]:
        totals.add_row("BN statistics", f"left as they were at {len(left)} layers ({left[0].node}, ...): "
                                        f"{min(r.values for r in left)} values per channel in the calibration "
                                        f"data, fewer than {MIN_VALUES}; give more samples")
    for name, sqnr in report.output_sqnr_db.items():
        totals.add_row(f"SQNR {name}", f"{sqnr:.1f} dB vs the unpruned model on the calibration data")
    for note in report.notes:
        totals.add_row("note", note)
    return Group(table, totals)
