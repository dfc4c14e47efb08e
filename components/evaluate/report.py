"""The evaluation report: a models × tasks table, deltas against the promoted baseline, plots.

    md = render_markdown(results)          # KFP Markdown artifact / manifest.report_markdown
    html = render_html(results)            # KFP HTML artifact: one self-contained file (PNG inlined)

`results` is the stage's results JSON (see `kubellm.evaluate.stage`). Plots: training loss per model
(from each model manifest's metrics JSONL or `metadata["loss_curve"]`) and headline score per model
in the order given (base → SFT → DPO reads as a stage-by-stage progression).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any

from kubellm.evaluate.metrics import stderr_name

UNLIKE_SETTINGS = ("Warning: the baseline's scores come from different evaluation settings or data (tasks, "
                   "limit, few-shot, eval items, …): its Δ compares unlike numbers.")


def baseline_notes(results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(warnings, notes) about where the baseline's numbers come from: tasks whose pointer scores were
    measured under other settings (Δ compares unlike numbers), and tasks on which the promoted model
    was re-scored in this run (Δ and max_drop use those)."""
    base = results.get("baseline") or {}
    unlike = base.get("unlike")
    warnings = [f"Warning: the baseline's {t} score comes from different evaluation settings ({d}): its Δ "
                "compares unlike numbers." for t, d in sorted((unlike or {}).items())]
    if unlike is None and base.get("same_settings") is False:  # results written before per-task settings
        warnings = [UNLIKE_SETTINGS]
    notes = [f"Baseline {t}: {how}; Δ and max_drop use this run's number."
             for t, how in sorted((base.get("rescored") or {}).items())]
    return warnings, notes


# The report is published before the pointer moves (a pointer never names an unpublished report), so
# it cannot say "promoted": a concurrent gate may win the compare-and-swap (PromotionConflictError).
PROMOTING = ("promoting: the pointer is moved after this report is published, unless another gate "
             "moved it first (the run then fails with PromotionConflictError)")


def _fmt(v: float | None, metric: str = "") -> str:
    if v is None:
        return "—"
    if metric in ("perplexity", "nll"):
        return f"{v:.3f}"
    return f"{v:.4f}"


def _delta(v: float | None, b: float | None) -> str:
    if v is None or b is None:
        return "—"
    return f"{v - b:+.4f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the models × tasks table (headline metric, ± stderr, Δ vs baseline)."""
    columns = results["columns"]  # [(task, metric)]
    base = (results.get("baseline") or {}).get("scores", {})
    header = ["model"] + [f"{t} ({m})" for t, m in columns]
    rows = []
    for model in results["models"]:
        row = [model["label"]]
        for task, metric in columns:
            v = model["scores"].get(task, {}).get(metric)
            err = model["scores"].get(task, {}).get(stderr_name(metric))
            cell = _fmt(v, metric) + (f" ± {err:.3f}" if err is not None else "")  # a 0.0 stderr is shown
            b = base.get(task, {}).get(metric)
            if b is not None:
                cell += f" (Δ {_delta(v, b)})"
            row.append(cell)
        rows.append(row)
    if base:
        rows.append(["baseline (promoted)"] + [_fmt(base.get(t, {}).get(m), m) for t, m in columns])
    return header, rows


def _md(text: str) -> str:
    """Text as literal Markdown: a `|` would split a table cell, `<…>` would be raw HTML to a renderer,
    `[…](…)` a link and a backtick a code span (a model label is a directory name: it may hold any)."""
    text = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("`", "\\`")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(text: str) -> str:
    """Text as a Markdown code span: fenced by more backticks than any run inside it (CommonMark)."""
    longest = max((len(r) for r in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _mpl(text: str) -> str:
    """Text as a literal matplotlib label: `$…$` would be parsed as mathtext (and can fail to parse)."""
    return text.replace("$", r"\$")


def task_lines(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, `v1.0: 4 items, 0-shot, chat template off`) for each task run: the report's Tasks section
    (held-out perplexity counts tokens)."""
    lines = []
    for t, info in results["tasks"].items():
        n = info.get("n_samples")
        count = f"{n} {'tokens' if t == 'perplexity' else 'items'}, " if n else ""  # a group reports none
        lines.append((t, f"v{info.get('version')}: {count}{info.get('n_shot')}-shot, "
                         f"chat template {'on' if info.get('chat') else 'off'}"))
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    out = [f"# Evaluation: {_md(', '.join(m['label'] for m in results['models']))}", ""]
    out += ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    out.append("")
    base = results.get("baseline")
    if base:
        out.append(f"Baseline: promoted model {_code(base['label'] or base['model_uri'])} "
                   f"(digest `{base['model_digest'][:12]}`) from {_code(base['pointer'])}; Δ = model − baseline.")
        warnings, notes = baseline_notes(results)
        out += [x for w in warnings for x in ("", f"**{_md(w)}**")]
        out += [x for n in notes for x in ("", _md(n))]
    else:
        out.append("Baseline: none promoted yet.")
    gate = results.get("gate")
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        out += ["", f"## Gate ({_md(gate['candidate'])}): {verdict}" + (f" — {PROMOTING}" if gate.get("promoted") else "")]
        lines = [f"- {'✅' if c['passed'] else '❌'} {_md(c['message'])}" for c in gate["checks"]]
        lines += [f"- ⏭ {_md(t)} rule {_md(why)}" for t, why in sorted((gate.get("skipped") or {}).items())]
        out += lines or ["- no rules"]
    out += ["", "## Models", ""]
    for m in results["models"]:
        out.append(f"- **{_md(m['label'])}**: {_code(m['uri'])} (digest `{m['digest'][:12]}`)")
    out += ["", "## Tasks", ""]
    out += [f"- {_code(t)} {_md(line)}" for t, line in task_lines(results)]
    h = results["harness"]
    out += ["", f"lm-eval {h['lm_eval']}, transformers {h['transformers']}, torch {h['torch']}."]
    return "\n".join(out) + "\n"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(results: dict[str, Any]) -> dict[str, str]:
    """title -> base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    curves = [(m["label"], m.get("loss_curve") or []) for m in results["models"]]
    if any(c for _, c in curves):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, curve in curves:
            if curve:
                ax.plot([p[0] for p in curve], [p[1] for p in curve], label=_mpl(label))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        out["Training loss"] = _png(fig)
        plt.close(fig)
    labels = [_mpl(m["label"]) for m in results["models"]]
    columns = [(t, m) for t, m in results["columns"] if m not in ("perplexity", "nll")]
    if columns:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plotted: list[float] = []
        for task, metric in columns:
            ys = [m["scores"].get(task, {}).get(metric) for m in results["models"]]
            ax.plot(labels, [float("nan") if y is None else y for y in ys], marker="o", label=_mpl(f"{task} ({metric})"))
            b = (results.get("baseline") or {}).get("scores", {}).get(task, {}).get(metric)
            if b is not None:
                ax.axhline(b, linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
            plotted += [v for v in [*ys, b] if isinstance(v, int | float) and math.isfinite(v)]
        ax.set_ylabel("score")
        if plotted and all(0.0 <= v <= 1.0 for v in plotted):
            ax.set_ylim(-0.02, 1.02)  # accuracies: the whole 0..1 range; unbounded scores (a margin in
            # nats, ter, bits_per_byte) keep matplotlib's own limits, or they would be drawn off the plot
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("score per model (dotted: promoted baseline)")
        out["Score per stage"] = _png(fig)
        plt.close(fig)
    ppl = [(m["label"], m["scores"].get("perplexity", {}).get("perplexity")) for m in results["models"]]
    if any(v is not None for _, v in ppl):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([_mpl(lbl) for lbl, _ in ppl], [v or 0.0 for _, v in ppl])
        ax.set_ylabel("held-out perplexity")
        out["Held-out perplexity"] = _png(fig)
        plt.close(fig)
    return out


def render_html(results: dict[str, Any], markdown_text: str | None = None) -> str:
    """One self-contained HTML page (no external CSS/JS; images are data: URIs)."""
    header, rows = table_rows(results)
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>kubellm evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.pass{color:#070}.fail{color:#b00}</style>",
             "</head><body>", f"<h1>Evaluation: {e(', '.join(m['label'] for m in results['models']))}</h1>",
             "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    base = results.get("baseline")
    parts.append(f"<p>Baseline: {e(base['label'] or base['model_uri'])} ({e(base['model_digest'][:12])})</p>"
                 if base else "<p>Baseline: none promoted yet.</p>")
    if base:
        warnings, notes = baseline_notes(results)
        parts += [f"<p class='fail'><b>{e(w)}</b></p>" for w in warnings]
        parts += [f"<p>{e(n)}</p>" for n in notes]
    gate = results.get("gate")
    if gate:
        cls = "pass" if gate["passed"] else "fail"
        parts.append(f"<h2 class='{cls}'>Gate ({e(gate['candidate'])}): {'PASSED' if gate['passed'] else 'FAILED'}"
                     f"{' — ' + e(PROMOTING) if gate.get('promoted') else ''}</h2><ul>")
        parts += [f"<li class='{'pass' if c['passed'] else 'fail'}'>{e(c['message'])}</li>" for c in gate["checks"]]
        parts += [f"<li>⏭ {e(t)} rule {e(why)}</li>" for t, why in sorted((gate.get("skipped") or {}).items())]
        parts.append("</ul>")
    for title, png in plots(results).items():
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
    parts.append("<h2>Models</h2><ul>")
    parts += [f"<li><b>{e(m['label'])}</b>: {e(m['uri'])} (digest {e(m['digest'][:12])})</li>" for m in results["models"]]
    parts.append("</ul><h2>Tasks</h2><ul>")
    parts += [f"<li><code>{e(t)}</code> {e(line)}</li>" for t, line in task_lines(results)]
    h = results["harness"]
    parts.append(f"</ul><p>lm-eval {e(h['lm_eval'])}, transformers {e(h['transformers'])}, torch {e(h['torch'])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def summary(results: dict[str, Any], html_uri: str) -> str:
    """What a terminal shows at the end of a run: the score table and where the HTML report is."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += baseline_notes(results)[0]
    gate = results.get("gate")
    if gate:
        lines.append(f"gate ({gate['candidate']}): {'PASSED' if gate['passed'] else 'FAILED'}"
                     + (f", promoted -> {gate['pointer']}" if gate.get("promoted") else ""))
    lines.append(f"HTML report: {html_uri}")
    return "\n".join(lines)
