"""The report's figures, drawn with matplotlib (Agg) into PNG bytes the HTML inlines as base64.

Following the paper: Fig. 2 (compression time against peak memory, one point per method),
Fig. 3 (decode tokens/s per deploy library per compression category), Fig. 4
(trustworthiness per method), and one radar of the OMs per method. PNGs are written
without the `Software` metadata so the same data gives the same bytes.
"""

from __future__ import annotations

import io
import math

from .schema import GroupReport

_OM_AXES = ("om_ka", "om_ia", "om_perf", "om_gen", "om_train", "om_inf", "om_hard", "om_trust", "om_kick")
_OM_LABELS = {"om_ka": "OM_ka", "om_ia": "OM_ia", "om_perf": "OM_perf", "om_gen": "OM_gen", "om_train": "OM_train",
              "om_inf": "OM_inf", "om_hard": "OM_hard", "om_trust": "OM_trust", "om_kick": "OM_kick"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def _label(cell) -> str:
    return f"{cell.method} {cell.setting}"


def fig_train(group: GroupReport) -> bytes:
    """Paper Fig. 2: time of the compression step against its peak memory, one point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    kinds = {c.track3.memory_kind for c in group.cells}
    points = sorted(((c.track3.peak_memory_gb, c.track3.compress_s / 60, i, c) for i, c in enumerate(group.cells)), key=lambda p: p[1])
    for rank, (x, y, i, cell) in enumerate(points):
        ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
        # labels of neighbouring points alternate above and below, so close points stay readable
        ax.annotate(_label(cell), (x, y), textcoords="offset points", xytext=(-8, 8 if rank % 2 else -13), ha="right", fontsize=8)
    memory = "peak GPU memory (GB)" if kinds == {"gpu"} else "peak host RSS (GB)" if kinds == {"host_rss"} else "peak memory (GB, GPU or host RSS)"
    ax.set_xlabel(memory)
    ax.set_ylabel("compression time (min)")
    ax.set_title(f"Track 3: compression cost, {group.model} ({group.profile})")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, max(p[0] for p in points) * 1.15 or 1)
    ax.set_ylim(0, max(p[1] for p in points) * 1.15 or 1)
    return _png(fig)


def fig_radar(group: GroupReport) -> bytes | None:
    """One radar of the OMs per method, each OM scaled so that 1 reads "as good as the
    reference": OM/100 for the OMs against the dense model (1 = dense), and OM_train divided
    by the best OM_train of the group (1 = the cheapest method to compress; OM_train's own
    scale, where 1 is the most expensive method, would dwarf the others). None when fewer
    than three OMs exist."""
    axes = [om for om in _OM_AXES if any(o.om == om for c in group.cells for o in c.oms)]
    if len(axes) < 3:
        return None
    plt = _pyplot()
    angles = [2 * math.pi * i / len(axes) for i in range(len(axes))]
    fig, ax = plt.subplots(figsize=(5.2, 4.2), subplot_kw={"projection": "polar"})
    top = 1.0
    best_train = max((o.value for c in group.cells for o in c.oms if o.om == "om_train"), default=1.0)
    for i, cell in enumerate(group.cells):
        values = {o.om: o.value / (best_train if o.om == "om_train" else 100.0) for o in cell.oms}
        if not any(a in values for a in axes):
            continue
        r = [values.get(a, math.nan) for a in axes]  # an OM not scored is a gap, not the worst value (0)
        top = max(top, *(v for v in r if not math.isnan(v)))
        ax.plot(angles + angles[:1], r + r[:1], color=f"C{i % 10}", linewidth=1.5, label=_label(cell))
        ax.fill(angles + angles[:1], r + r[:1], color=f"C{i % 10}", alpha=0.12)
    ax.plot(angles + angles[:1], [1.0] * (len(axes) + 1), color="0.4", linestyle="--", linewidth=0.8, label="dense / cheapest (1)")
    ax.set_xticks(angles)
    ax.set_xticklabels([_OM_LABELS[a] + (" / best" if a == "om_train" else " / 100") for a in axes])
    ax.set_ylim(0, top * 1.1)
    ax.set_title(f"OMs per method, {group.model} ({group.profile})", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.05, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def fig_grouped_bars(title: str, ylabel: str, series: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: `series[group][bar] = value` (Fig. 3: category -> library -> tokens/s;
    Fig. 4: method -> robustness/truthfulness -> accuracy)."""
    plt = _pyplot()
    groups = list(series)
    bars = sorted({b for v in series.values() for b in v})
    fig, ax = plt.subplots(figsize=(max(5.2, 1.1 * len(groups) * max(1, len(bars)) / 2), 3.6))
    width = 0.8 / max(1, len(bars))
    for j, bar in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        # a bar a group lacks (a library a method was not deployed on) is left out, not drawn at 0
        shown = [(x, series[g][bar]) for x, g in zip(xs, groups) if bar in series[g]]
        ax.bar([x for x, _ in shown], [v for _, v in shown], width=width, label=bar, color=f"C{j % 10}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def fig_tokens_per_s(group: GroupReport) -> bytes | None:
    """Paper Fig. 3: decode tokens/s per library per compression category (track 5), or None."""
    series: dict[str, dict[str, float]] = {}
    for cell in group.cells:
        for m in cell.metrics:
            if m.track == 5 and m.compressed is not None:
                if m.dense is not None:  # a later cell without a dense deploy must not zero the dense bar
                    series.setdefault("dense", {})[m.metric] = m.dense
                series.setdefault(_label(cell), {})[m.metric] = m.compressed
    if not series:
        return None
    return fig_grouped_bars(f"Track 5: decode tokens/s, {group.model}", "tokens/s", series)


def fig_trust(group: GroupReport) -> bytes | None:
    """Paper Fig. 4: mean robustness (AdvGLUE) and truthfulness (TruthfulQA) per method (track 6), or None."""
    from ...tracks.scoring import METRICS

    series: dict[str, dict[str, float]] = {}
    for cell in group.cells:
        sums: dict[str, list[float]] = {}
        dense: dict[str, list[float]] = {}
        for m in cell.metrics:
            if m.track == 6 and m.compressed is not None:
                term = METRICS[6, m.metric].group
                sums.setdefault(term, []).append(m.compressed)
                if m.dense is not None:
                    dense.setdefault(term, []).append(m.dense)
        if sums:
            series[_label(cell)] = {k: sum(v) / len(v) for k, v in sums.items()}
            if dense and "dense" not in series:
                series["dense"] = {k: sum(v) / len(v) for k, v in dense.items()}
    if not series:
        return None
    return fig_grouped_bars(f"Track 6: trustworthiness, {group.model}", "accuracy (%)", series)
