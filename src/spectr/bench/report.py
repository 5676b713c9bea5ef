"""What people read from a bench run: Markdown tables and PNG plots, from the raw JSON alone.

`spectr bench report` re-renders them from a saved JSON, so the published
figures always come from one recorded run.
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def without_machine_paths(argument: str) -> str:
    """A command-line argument as results show it: an absolute path, alone or as a flag's value after
    '=', by its name (a model's file or folder, an output folder), not this machine's folders."""
    flag, equals, value = argument.partition("=")
    if equals and os.path.isabs(value):
        return f"{flag}={Path(value).name}"
    return Path(argument).name if os.path.isabs(argument) else argument


def _fmt(value, digits=2, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _rows(result: dict, suite: str, temperature: float) -> list[dict]:
    return [r for r in result["summary"] if r["suite"] == suite and r["temperature"] == temperature]


def best_spectr(result: dict, temperature: float, suite: str = "all", draft: str = "") -> dict | None:
    """The fastest K-SEQ (k, L) of the grid at this temperature (with the bench's draft, or a compared one)."""
    rows = [r for r in _rows(result, suite, temperature)
            if r["rule"] == "kseq" and r["kind"] == "spectr" and r.get("draft", "") == draft]
    return max(rows, key=lambda r: r["tokens_per_second"], default=None)


def best_sd(result: dict, temperature: float, suite: str = "all", draft: str = "") -> dict | None:
    """The fastest one-draft, token-wise verified L of the grid."""
    rows = [r for r in _rows(result, suite, temperature)
            if r["kind"] == "sd" and r["rule"] in ("standard", None) and r.get("draft", "") == draft]
    return max(rows, key=lambda r: r["tokens_per_second"], default=None)


def best_beyond_kseq(result: dict, temperature: float, suite: str = "all", draft: str = "") -> dict | None:
    """The fastest fixed shape of the newer methods: block verification, the two-step importance rule,
    dynamic and greedy trees."""
    rows = [r for r in _rows(result, suite, temperature)
            if (r["rule"] in ("block", "importance") or r.get("tree", "iid") in ("dynamic", "greedy")) and r.get("draft", "") == draft]
    return max(rows, key=lambda r: r["tokens_per_second"], default=None)


def headline_table(result: dict) -> str:
    """Per temperature: ar, best sd, best SpecTr, the peers; tok/s and speedups over all suites."""
    lines = ["| T | method | tok/s | vs spectr ar | vs HF generate | block efficiency |", "|---|---|---|---|---|---|"]
    for temperature in result["config"]["temperatures"]:
        picked = []
        rows = {r["method"]: r for r in _rows(result, "all", temperature)}
        for name in ("spectr ar",):
            if name in rows:
                picked.append(rows[name])
        for draft in ("", *result["config"].get("compared_drafts", ())):
            auto = rows.get("spectr auto" + (f" [{draft}]" if draft else ""))
            for row in (auto, best_sd(result, temperature, draft=draft), best_spectr(result, temperature, draft=draft),
                        best_beyond_kseq(result, temperature, draft=draft)):
                if row is not None:
                    picked.append(row)
        picked += [r for r in rows.values() if r["family"] != "spectr"]
        for r in picked:
            fixed = r["kind"] in ("sd", "spectr") and r.get("tree", "iid") != "auto"
            label = r["method"] + (" (best of grid)" if fixed else "")
            lines.append(f"| {temperature:g} | {label} | {r['tokens_per_second']:.1f} | "
                         f"{_fmt(r['speedup_vs_ar'], 2, '×')} | {_fmt(r['speedup_vs_hf'], 2, '×')} | "
                         f"{_fmt(r['block_efficiency'])} |")
    return "\n".join(lines)


def full_table(result: dict, temperature: float) -> str:
    suites = list(result["config"]["suites"]) + ["all"]
    header = "| method | " + " | ".join(f"{s} tok/s (×ar, BE)" for s in suites) + " | acceptance by position (all) | " \
             "draft / verify / select / other |"
    lines = [header, "|" + "---|" * (len(suites) + 3)]
    names = [m["name"] for m in result["config"]["methods"]]
    for name in names:
        cells = []
        overall = None
        for suite in suites:
            row = next((r for r in _rows(result, suite, temperature) if r["method"] == name), None)
            if suite == "all":
                overall = row
            cells.append("–" if row is None else f"{row['tokens_per_second']:.1f} ({_fmt(row['speedup_vs_ar'])}, "
                         f"{_fmt(row['block_efficiency'])})")
        accepted = " ".join(f"{a:.2f}" for a in overall["acceptance_per_position"]) if overall else ""
        split = overall["time_split"] if overall else {}
        split_text = " / ".join(f"{split[p]:.0%}" for p in ("draft", "verify", "select", "other")) if split else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {accepted} | {split_text} |")
    return "\n".join(lines)


def plots(result: dict, output: Path) -> list[Path]:
    """Block efficiency vs k for each L, and speedup vs k for each L (one panel per temperature)."""
    output.mkdir(parents=True, exist_ok=True)
    temperatures = result["config"]["temperatures"]
    written = []
    for key, label, name in (("block_efficiency", "block efficiency (tokens per target pass)", "block_efficiency"),
                             ("speedup_vs_ar", "speedup over spectr ar", "speedup")):
        figure, axes = plt.subplots(1, len(temperatures), figsize=(4.5 * len(temperatures), 3.6), squeeze=False)
        for axis, temperature in zip(axes[0], temperatures):
            rows = [r for r in _rows(result, "all", temperature) if r["rule"] in ("kseq", "standard")]
            for length in sorted({r["L"] for r in rows}):
                points = sorted((r["k"], r[key]) for r in rows if r["L"] == length and r[key] is not None)
                if points:
                    axis.plot(*zip(*points), marker="o", label=f"L = {length}")
            axis.set_xscale("log", base=2)
            axis.set_xlabel("k (drafts; k = 1 is standard speculative decoding)")
            axis.set_title(f"T = {temperature:g}")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel(label)
        axes[0][-1].legend()
        figure.tight_layout()
        path = output / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    long_suites = [suite for suite in result["config"]["suites"] if suite.startswith("long-")]
    if len(long_suites) > 1:
        written.append(context_plot(result, long_suites, output))
    if result.get("rules_vs_optimal"):
        data = result["rules_vs_optimal"]
        figure, axes = plt.subplots(1, len(data), figsize=(4.5 * len(data), 3.6), squeeze=False)
        for axis, (temperature, curves) in zip(axes[0], data.items()):
            for rule, points in curves.items():
                axis.plot(*zip(*sorted((int(k), v) for k, v in points.items())), marker="o", label=rule)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("k")
            axis.set_title(f"T = {temperature}")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel("first-token acceptance")
        axes[0][-1].legend()
        figure.tight_layout()
        path = output / "rules_vs_optimal.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _prompt_tokens(result: dict, suite: str) -> float:
    records = [r for r in result["records"] if r["suite"] == suite]
    return sum(r["prompt_tokens"] for r in records) / len(records)


def best_by_draft(result: dict, temperature: float, suite: str) -> dict[str, dict]:
    """Per draft (the bench's, each compared one, each approximate mode): its fastest method in this suite."""
    best: dict[str, dict] = {}
    for row in _rows(result, suite, temperature):
        if row["family"] != "spectr" or (row["kind"] == "ar" and not row.get("draft")):
            continue
        label = row.get("draft") or "the bench's draft"
        if label not in best or row["tokens_per_second"] > best[label]["tokens_per_second"]:
            best[label] = row
    return best


def context_plot(result: dict, suites: list[str], output: Path) -> Path:
    """Speedup over spectr's plain loop against the prompt's length: each draft's best method per suite."""
    temperatures = result["config"]["temperatures"]
    figure, axes = plt.subplots(1, len(temperatures), figsize=(5 * len(temperatures), 3.8), squeeze=False)
    for axis, temperature in zip(axes[0], temperatures):
        curves: dict[str, list[tuple[float, float]]] = {}
        for suite in suites:
            for label, row in best_by_draft(result, temperature, suite).items():
                if row["speedup_vs_ar"] is not None:
                    curves.setdefault(label, []).append((_prompt_tokens(result, suite), row["speedup_vs_ar"]))
        for label, points in curves.items():
            axis.plot(*zip(*sorted(points)), marker="o", label=label, linestyle="--" if "APPROXIMATE" in label else "-")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens")
        axis.set_title(f"T = {temperature:g}")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("best speedup over spectr ar")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    path = output / "speedup_by_context.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def approximate_table(result: dict) -> str:
    """Each approximate mode: its measured distance from the target's law, and its speed."""
    lines = ["| mode | suite | mean TV from the exact law | max TV | positions | " +
             " | ".join(f"tok/s ×ar at T={t:g}" for t in result["config"]["temperatures"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(result["config"]["temperatures"])]
    for label, deviation in result["approximate"].items():
        for suite, measured in deviation.items():
            speeds = []
            for temperature in result["config"]["temperatures"]:
                row = next((r for r in _rows(result, suite, temperature) if r["method"] == f"spectr ar [{label}]"), None)
                speeds.append("–" if row is None else _fmt(row["speedup_vs_ar"], 2, "×"))
            lines.append(f"| {label} | {suite} | {measured['mean_tv']:.4f} | {measured['max_tv']:.4f} | "
                         f"{measured['positions']} | " + " | ".join(speeds) + " |")
    return "\n".join(lines)


def markdown(result: dict, images: list[Path], relative_to: Path, command: str) -> str:
    config = result["config"]
    parts = [
        "# spectr benchmark results", "",
        f"Produced by `{command}`; raw numbers in the JSON next to the plots. Engine: {result['engine']}. "
        f"Machine: {result['machine'].get('processor') or result['machine']['platform']}, "
        f"{result['machine']['threads']} threads.", "",
        f"Suites {', '.join(config['suites'])} ({config['prompts_per_suite']} prompts each), "
        f"{config['max_new_tokens']} new tokens per prompt (end-of-sequence does not stop anyone), top-k and "
        "top-p off for every method. Methods interleaved prompt by prompt; speedups are ratios of tok/s "
        "measured in this one run. tok/s counts decoding: the prompt's pass is timed apart (the peers' first "
        "token comes out of that pass, so theirs is counted a token's step early: ~1 % in their favour at "
        "96 tokens). BE = block efficiency, emitted tokens per target forward.", "",
        "## Headline (all suites)", "", headline_table(result), "",
    ]
    if result["skipped"]:
        parts += ["Skipped here: " + "; ".join(f"**{s['method']}**: {s['reason']}" for s in result["skipped"]), ""]
    if result.get("approximate"):
        parts += ["## Approximate modes (not exact)", "",
                  "These change the output distribution: each next-token law is moved by the total variation below "
                  "(T = 1, along the target's own continuations, both laws over the same exact cache). Every "
                  "other method here samples exactly from the target.", "", approximate_table(result), ""]
    for temperature in config["temperatures"]:
        parts += [f"## T = {temperature:g}", "", full_table(result, temperature), ""]
    for image in images:
        parts += [f"![{image.stem}]({os.path.relpath(image, relative_to)})", ""]
    if result.get("rules_vs_optimal"):
        parts += ["First-token acceptance of each rule at real (p, q) pairs of this target and draft, against "
                  "α* (the optimal transport acceptance, exact: the best token set is one of those ordered by p/q, "
                  "rules/optimal.py).", ""]
    return "\n".join(parts)


def write_report(result: dict, folder: Path, command: str, docs: Path | None = None) -> Path:
    images = plots(result, folder)
    (folder / "results.md").write_text(markdown(result, images, folder, command))
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(markdown(result, images, docs.parent, command))
    return folder / "results.md"
