"""docs/bench/ppl_vs_bits.png (held-out perplexity against effective bits per weight of the decoder
Linears) and the markdown tables of docs/benchmarks.md, from the JSON the benchmarks wrote.

    .venv/bin/python -m bench.plot          # writes the PNG, prints the tables
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import common  # noqa: E402
from bench.compensation import Options, chosen_options  # noqa: E402
from bench.target import PREFIX as TARGET_PREFIX  # noqa: E402

SERIES = {  # setting base run -> label
    "gptq3_g64": "GPTQ 3-bit g64 +",
    "sparsegpt_2of4": "SparseGPT 2:4 +",
    "sparsegpt_2of4_gptq4_g64": "SparseGPT 2:4 + GPTQ 4-bit +",
    "gptq3_g64_actorder": "GPTQ 3-bit g64 act-order +",
}
VARIANTS = {
    "svd_r16": ("SVD r16", "v"),
    "svd_r64": ("SVD r64", "^"),
    "eora_r16": ("EoRA r16", "s"),
    "eora_r64": ("EoRA r64", "D"),
    "eora_budget_r64eq_relnorm": ("EoRA budget (=r64)", "X"),
    "eora_budget_r64eq_relnorm_min32": ("EoRA budget (=r64), floor r32", "P"),
    "eora_r64_adapter4bit": ("EoRA r64, 4-bit adapter", "*"),
}


DIAGNOSTICS = {  # run-name prefix of bench.compensation's diagnostic rows -> table title
    "diag_wikicalib_": "calibrated in-domain (Wikipedia after the evaluation windows)",
    "diag_cal128_": "calibrated on 128 Lee windows instead of 64 (the first 64 are the protocol's)",
}


def variant_runs(base_name: str, chosen: Options | None) -> list[tuple[str, str, dict]]:
    """(label, marker, run) per plotted variant; EoRA rows with the chosen options where they were run (exact
    EoRA otherwise), so the figure shows one point per method and rank."""
    out = []
    for variant, (label, marker) in VARIANTS.items():
        run = None
        if chosen and chosen.tag and variant.startswith("eora"):
            run = common.load_run(f"{base_name}__{chosen.suffixed(variant)}")
            label = f"{label}, {chosen.label()}" if run is not None else label
        run = run or common.load_run(f"{base_name}__{variant}")
        if run is not None:
            out.append((label, marker, run))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits, ppl) points no other point beats on both, by increasing bits."""
    front: list[tuple[float, float]] = []
    for bits, ppl in sorted(points):
        if not front or ppl < front[-1][1]:
            front.append((bits, ppl))
    return front


def main() -> int:
    from matplotlib.lines import Line2D

    fp32 = json.loads((common.RESULTS / "fp32_reference.json").read_text())["ppl"]
    fig, ax = plt.subplots(figsize=(12, 6.5))
    points: list[tuple[float, float]] = []  # every configuration drawn, for the Pareto front

    def alpha(run: dict) -> float:  # rows from before issue 15's fixes are drawn faded
        return 1.0 if common.on_fixed_code(run) else 0.35

    families = [  # uncompensated lines: (runs, style, label)
        (("gptq3_g64", "gptq4_g64", "gptq8_g64"), "-o", "k", "GPTQ g64, no act-order (3/4/8-bit)"),
        (("gptq3_g64_actorder", "gptq4_g64_actorder"), "--^", "k", "GPTQ g64 act-order, the job default (3/4-bit)"),
        (("rtn3_g64", "rtn4_g64"), ":x", "grey", "RTN g64 (3/4-bit)"),
    ]
    for names, style, color, label in families:
        runs = [(n, r) for n in names if (r := common.load_run(n))]
        if not runs:
            continue
        ax.plot([r["bits"]["total"] for _, r in runs], [r["ppl"] for _, r in runs], style, color=color, mfc="none",
                label=label, alpha=min(alpha(r) for _, r in runs))
        points += [(r["bits"]["total"], r["ppl"]) for _, r in runs]
    colors = {"gptq3_g64": "tab:blue", "sparsegpt_2of4": "tab:red", "sparsegpt_2of4_gptq4_g64": "tab:green",
              "gptq3_g64_actorder": "tab:purple"}
    markers_used: dict[str, str] = {}
    for base_name, label in SERIES.items():
        base = common.load_run(base_name)
        if base is None:
            continue
        color = colors[base_name]
        series = [(base["bits"]["total"], base["ppl"])]
        ax.plot(*series[0], "o", color=color, mfc="none", ms=9, alpha=alpha(base))
        for vlabel, marker, run in variant_runs(base_name, chosen_options()):
            ax.plot(run["bits"]["total"], run["ppl"], marker, color=color, ms=8, alpha=alpha(run))
            markers_used[vlabel.split(", damp")[0]] = marker
            series.append((run["bits"]["total"], run["ppl"]))
        points += series
        ax.plot([], [], "s", color=color, label=f"{label.rstrip(' +')} (+ compensation: marker below)")
    front = pareto_front(points)
    ax.step([b for b, _ in front], [p for _, p in front], "-", where="post", color="tab:orange", lw=2.5, alpha=0.5,
            zorder=0, label="Pareto front of the fixed configurations drawn")
    draw_targets(ax, alpha)
    ax.axhline(fp32, color="grey", ls=":", label=f"fp32 reference ({fp32:.2f}; 16 bits stored as fp16)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", mfc="none", color="k", label="no compensation")]
    handles += [Line2D([], [], ls="", marker=m, color="k", label=v) for v, m in markers_used.items()]
    handles += [Line2D([], [], ls="", marker="o", color="k", alpha=0.35,
                       label=f"faded: measured before issue 15's fixes ({common.FIXES_COMMIT})")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight, decoder Linears (codes + scales/zeros + 2:4 mask + adapters)")
    ax.set_ylabel("held-out perplexity (80 x 512 Wikipedia tokens, log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs storage (EoRA with damp 1.0 where run)")
    ax.grid(True, which="both", alpha=0.3)
    out = common.RESULTS / "ppl_vs_bits.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)
    print(tables())
    return 0


TARGET_MARKERS = {"transformers": ("*", "tab:brown"), "vllm": ("P", "tab:pink")}


def draw_targets(ax, alpha) -> None:
    """bench.target's rows on top, one unjoined family per (engine, compensation): each point is a plan
    chosen for its target, not a setting varied along a line."""
    families: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(common.RUNS.glob(f"{TARGET_PREFIX}*.json")):
        run = json.loads(path.read_text())
        families.setdefault((run["planning"]["engine"], path.stem.rsplit("_", 1)[1]), []).append(run)
    for (engine, compensation), runs in families.items():
        marker, color = TARGET_MARKERS[engine]
        for i, run in enumerate(runs):
            ax.plot(run["bits"]["total"], run["ppl"], marker, color=color, ms=13, mec="k", zorder=5, alpha=alpha(run),
                    label=f"size target, engine {engine}, compensation {compensation}" if i == 0 else None)


NAMES = {
    "gptq4_g64": "GPTQ 4-bit g64",
    "rtn4_g64": "RTN 4-bit g64",
    "gptq3_g64": "GPTQ 3-bit g64",
    "gptq4_g64_actorder": "GPTQ 4-bit g64, act-order",
    "gptq3_g64_actorder": "GPTQ 3-bit g64, act-order",
    "rtn3_g64": "RTN 3-bit g64",
    "sparsegpt_2of4": "SparseGPT 2:4",
    "magnitude_2of4": "magnitude 2:4",
    "wanda_2of4": "Wanda 2:4",
    "sparsegpt_2of4_gptq4_g64": "SparseGPT 2:4 + GPTQ 4-bit g64",
    "gptq8_g64": "GPTQ 8-bit g64",
}


PRE_FIX = "(pre-fix)"


def pre_fix_mark(run: dict) -> str:
    return "" if common.on_fixed_code(run) else f" {PRE_FIX}"


def tables() -> str:
    lines = []
    fp32 = json.loads((common.RESULTS / "fp32_reference.json").read_text())["ppl"]
    lines += [f"Rows marked {PRE_FIX} ran on code from before issue 15's numeric fixes (commit "
              f"{common.FIXES_COMMIT}); the others on code that contains them.", "",
              "### Quality", "", "| configuration | perplexity | x fp32 | bits/weight | compress wall (s) | eval (s) |",
              "|---|---:|---:|---:|---:|---:|", f"| fp32 reference | {fp32:.2f} | 1.00 | 16 | - | - |"]
    for name, label in NAMES.items():
        run = common.load_run(name)
        if run is not None:
            lines.append(f"| {label}{pre_fix_mark(run)} | {run['ppl']:.2f} | {run['ppl'] / fp32:.2f} | "
                         f"{run['bits']['total']:.3f} | {run['compress_wall_seconds']:.0f} | {run['eval_seconds']:.0f} |")
    sweep = common.RESULTS / "damp_sweep.json"
    if sweep.exists():
        record = json.loads(sweep.read_text())
        lines += ["", f"### EoRA option sweep ({record['setting']}, rank {record['rank']}; chosen on validation)", "",
                  "| compensation.sink_tokens | compensation.damp | validation ppl | evaluation ppl |", "|---:|---:|---:|---:|"]
        for row in record["rows"]:
            chosen = {"damp": row["damp"], "sink_tokens": row["sink_tokens"]} == record["chosen"]
            lines.append(f"| {row['sink_tokens']} | {row['damp']:g}{' (chosen)' if chosen else ''} | "
                         f"{row['val_ppl']:.2f} | {row['ppl']:.2f} |")
    path = common.RESULTS / "compensation.json"
    if path.exists():
        comp = json.loads(path.read_text())
        for setting in comp["settings"].values():
            base = NAMES[setting["base"]]
            lines += ["", f"### {base}", "",
                      "| compensation | perplexity | validation ppl | gap recovered | bits/weight (codes+scales+mask+adapters) | "
                      "adapter params | max rank | GPTQ/prune s/layer | compensation s/layer |",
                      "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
            for variant, row in setting["rows"].items():
                b = row["bits"]
                split = (f"{b['total']:.3f} = {b['codes']:.2f}+{b['scales_zeros']:.3f}"
                         f"+{b['sparsity_metadata']:.0f}+{b['adapters']:.3f}")
                gap = "-" if variant == "none" else f"{100 * row['gap_recovered']:.1f}%"
                val = "-" if row.get("val_ppl") is None else f"{row['val_ppl']:.2f}"
                label = variant if row["fixed_code"] else f"{variant} {PRE_FIX}"
                lines.append(f"| {label} | {row['ppl']:.2f} | {val} | {gap} | {split} | {row['adapter_params']:,} | "
                             f"{row['max_rank']} | {row['compress_seconds_per_layer_mean']:.2f} | "
                             f"{row['compensate_seconds_per_layer_mean']:.2f} |")
            lines += ["", "checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in setting["checks"].items())]
    path = common.RESULTS / "target.json"
    if path.exists():
        lines += ["", *target_table(json.loads(path.read_text()))]
    chosen = chosen_options()
    for prefix, title in DIAGNOSTICS.items():
        grid, shown = diagnostic_grid(prefix, chosen)
        others = [p for p in sorted(common.RUNS.glob(f"{prefix}*.json")) if p.stem.removeprefix(prefix) not in shown]
        if shown:
            lines += ["", f"### Diagnostic: {title}", "", *grid]
        if others:  # diagnostic runs outside the grid's columns
            lines += ["", "| other run | perplexity | same row, protocol calibration |", "|---|---:|---:|"]
        for path in others:
            name = path.stem.removeprefix(prefix)
            run, protocol_run = json.loads(path.read_text()), common.load_run(name)
            ref = "-" if protocol_run is None else f"{protocol_run['ppl']:.2f}{pre_fix_mark(protocol_run)}"
            lines.append(f"| {name}{pre_fix_mark(run)} | {run['ppl']:.2f} | {ref} |")
    return "\n".join(lines)


def target_table(summary: dict) -> list[str]:
    """bench.target's summary: each row against the best fixed row at <= its target, and its cost."""
    lines = ["### Size target (issue 16)", "",
             "| row | stored bits | perplexity | validation ppl | best fixed at <= target (evaluation) | "
             "best fixed at <= target (validation) | planning s (sensitivity / forward / measurement) | compression s | "
             "job time / gptq4_g64_actorder's | job time / its own compression |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]

    def fixed(best: dict | None, key: str) -> str:
        return "-" if best is None else f"{best['name']} {best[key]:.2f} ({best['bits']:.3f} bits)"

    def planning(seconds: dict) -> str:
        parts = seconds.get("planning_parts")  # rows before the parts were timed: the total only
        split = "" if not parts else \
            f" ({parts['sensitivity']:.0f} / {parts['forward']:.0f} / {parts['measurement']:.0f})"
        return f"{seconds['planning']:.0f}{split}"

    for name, row in summary["rows"].items():
        ratio = "-" if row["cost_ratio"] is None else f"{row['cost_ratio']:.2f}"
        lines.append(f"| {name}{'' if row['fixed_code'] else f' {PRE_FIX}'} | {row['bits']:.3f} | {row['ppl']:.2f} | "
                     f"{row['val_ppl']:.2f} | {fixed(row['best_fixed']['evaluation'], 'ppl')} | "
                     f"{fixed(row['best_fixed']['validation'], 'val_ppl')} | {planning(row['seconds'])} | "
                     f"{row['seconds']['compression']:.0f} | {ratio} | {row['cost_ratio_own_compression']:.2f} |")
    lines += [f"| {name} | cannot be met: {reason} | | | | | | | | |" for name, reason in summary["infeasible"].items()]
    return lines


def diagnostic_grid(prefix: str, chosen: Options | None) -> tuple[list[str], set[str]]:
    """The issue's comparisons on one diagnostic protocol: a row per setting, each cell "diagnostic
    (protocol)" evaluation perplexity, a "*" after a number whose row ran before issue 15's fixes, then
    how many EoRA-vs-SVD pairs and budget-vs-uniform settings the diagnostic rows win, counted only where
    both sides were run on the fixed code (pairs with a pre-fix side are counted apart). Also the run
    names (without the prefix) shown."""
    eora = chosen.suffixed if chosen else (lambda name: name)
    columns = {"none": "", "SVD r16": "svd_r16", "EoRA r16": eora("eora_r16"), "SVD r64": "svd_r64",
               "EoRA r64": eora("eora_r64"), "budget (=r64)": eora("eora_budget_r64eq_relnorm")}
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    pairs = {"EoRA beats SVD": [0, 0], "budget beats uniform rank 64": [0, 0]}
    pre_fix_pairs = dict.fromkeys(pairs, 0)
    shown: set[str] = set()

    def cell(name: str) -> str:
        run = common.load_run(name)
        return "-" if run is None else f"{run['ppl']:.2f}" + ("" if common.on_fixed_code(run) else "*")

    for base_name, label in SERIES.items():
        got: dict[str, dict | None] = {}
        cells = []
        for column, variant in columns.items():
            name = f"{base_name}__{variant}" if variant else base_name
            got[column] = common.load_run(prefix + name)
            if got[column] is not None:
                shown.add(name)
            ref = cell(name)
            cells.append(cell(prefix + name) + ("" if ref == "-" else f" ({ref})"))
        if all(v is None for v in got.values()):
            continue
        lines.append(f"| {label.removesuffix(' +')} | " + " | ".join(cells) + " |")
        for key, (ours, theirs) in [("EoRA beats SVD", ("EoRA r16", "SVD r16")), ("EoRA beats SVD", ("EoRA r64", "SVD r64")),
                                    ("budget beats uniform rank 64", ("budget (=r64)", "EoRA r64"))]:
            a, b = got[ours], got[theirs]
            if a is None or b is None:
                continue
            if common.on_fixed_code(a) and common.on_fixed_code(b):
                pairs[key][0] += a["ppl"] < b["ppl"]
                pairs[key][1] += 1
            else:
                pre_fix_pairs[key] += 1
    counts = [f"{k}: {won} of {n}" for k, (won, n) in pairs.items() if n]
    counts += [f"{k}: {n} pair(s) with a pre-fix side, not counted" for k, n in pre_fix_pairs.items() if n]
    lines += ["", "* ran before issue 15's fixes.", "", "diagnostic rows on the fixed code: " + ("; ".join(counts) or "none")]
    return lines, shown


if __name__ == "__main__":
    raise SystemExit(main())
