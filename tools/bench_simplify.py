"""Simplification side by side (issue 4): graphopt's default pipeline vs onnxsim, onnxslim, onnxoptimizer,
onnxscript's optimizer and onnxruntime's offline ORT_ENABLE_BASIC graph, on the zoo, in one run.

graphopt runs twice: ``graphopt`` is the default pipeline (level "fuse": it may introduce fused operators
for onnxruntime), ``graphopt_simplify`` stops at level "simplify" (only removes and folds redundancy), the
like-for-like comparison with the simplifiers. Verdicts and summary lines are given for both.

Per zoo model and tool: node counts (top level, and total with If/Loop/Scan bodies), file size, tool wall
time (median of ``--repeat`` runs, tools interleaved run by run), peak RSS, whether the output matches the
original in onnxruntime at the zoo's input shape and, for dynamic models, at a second shape (a tool that
bakes a shape in fails there), and onnxruntime CPU latency under ORT_DISABLE_ALL and ORT_ENABLE_ALL of
every output (all variants interleaved, medians). Every tool runs in its own process with a timeout, so
a crash or hang costs one cell. A synthetic ~200k-node transformer stack times the pipeline at scale.

    python tools/bench_simplify.py --json out.json --md out.md          # every small zoo model + synthetic
    python tools/bench_simplify.py --only bert_base_torchscript --synthetic 0
    python tools/bench_simplify.py --full                                # adds the full-size zoo models
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.child import run_in_child
from tools.bench.markdown import table
from tools.bench.numerics import PRIMARY, SECOND, check_in_children, write_feeds
from tools.bench.results import write_json
from tools.bench.sessions import needs_external_data
from tools.bench.simplifiers import GRAPHOPT, PEERS, TOOLS
from tools.bench.stats import model_stats

log = logging.getLogger("bench_simplify")

ORIGINAL = "original"
TOOL_ORDER = (*PEERS, "graphopt_simplify", "graphopt")
LEVELS = ("disable_all", "all")
#: Memory of one onnxruntime session per byte of model file: ~1.5 measured (BERT-base, 436 MB file, 650 MB
#: per session at either level), plus room for activations.
SESSION_BYTES_PER_FILE_BYTE = 1.8


@dataclass
class BenchConfig:
    """What to run; the defaults are the issue's protocol, tests shrink them."""

    tools: Sequence[str] = TOOL_ORDER
    repeat: int = 3
    timeout: float = 600.0
    check_timeout: float = 600.0
    latency_runs: int = 20
    warmup: int = 3
    latency: bool = True


# ------------------------------------------------------------------------------------------ one model


def bench_model(name: str, path: str | Path, feed_sets: Mapping[str, Mapping[str, Any]], workdir: str | Path,
                cfg: BenchConfig | None = None) -> dict[str, Any]:
    """Run every tool on one model and measure everything; returns a JSON-serializable dict.

    ``feed_sets`` maps ``"primary"`` (and ``"second"`` for dynamic models) to onnxruntime inputs.
    """
    cfg = cfg or BenchConfig()
    workdir = Path(workdir).resolve() / name
    workdir.mkdir(parents=True, exist_ok=True)
    feeds_file = str(workdir / "feeds.pkl")
    write_feeds(feeds_file, feed_sets)
    variants: dict[str, dict[str, Any]] = {ORIGINAL: {"ok": True, "error": None, "path": str(path)}}
    variants.update(_run_tools(str(path), workdir, cfg))
    for variant in variants.values():
        if variant["ok"]:
            variant["stats"] = model_stats(variant["path"]).to_dict()
    _check_outputs(str(path), variants, feeds_file, workdir, cfg)
    if cfg.latency:
        _measure_latency(variants, feeds_file, cfg)
    result = {"model": name, "path": str(path), "shapes": sorted(feed_sets), "variants": variants}
    result["verdict"] = {subject: verdict(variants, subject) for subject in GRAPHOPT if subject in variants}
    return result


def _run_tools(src: str, workdir: Path, cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """``repeat`` rounds of every tool, interleaved (A B C A B C); a tool that fails once is not rerun."""
    runs: dict[str, list[Any]] = {tool: [] for tool in cfg.tools}
    options = {"external_data": needs_external_data(src)}
    for round_ in range(cfg.repeat):
        for tool in cfg.tools:
            if runs[tool] and not runs[tool][-1].ok:
                continue
            dst = workdir / tool / "model.onnx"
            res = run_in_child("tools.bench.simplifiers:run_tool", {"tool": tool, "src": src, "dst": str(dst),
                                                                      "options": options},
                               timeout=cfg.timeout, preload=TOOLS[tool][1])
            log.info("  %-13s round %d: %s", tool, round_ + 1,
                     f"{res.seconds:.2f} s, {res.peak_rss_mb:.0f} MB" if res.ok else res.error)
            runs[tool].append(res)
    out = {}
    for tool, results in runs.items():
        last = results[-1]
        good = [r for r in results if r.ok]
        out[tool] = {
            "ok": last.ok,
            "error": last.error,
            "timed_out": last.timed_out,
            "path": str(workdir / tool / "model.onnx"),
            "seconds": [r.seconds for r in good],
            "seconds_median": statistics.median(r.seconds for r in good) if last.ok else None,
            "peak_rss_mb": statistics.median(r.peak_rss_mb for r in good) if last.ok else None,
            "rss_above_baseline_mb": statistics.median(r.rss_above_baseline_mb for r in good) if last.ok else None,
            "info": last.value if last.ok else None,
        }
    return out


def _check_outputs(src: str, variants: dict[str, dict[str, Any]], feeds_file: str, workdir: Path,
                   cfg: BenchConfig) -> None:
    candidates = {label: v["path"] for label, v in variants.items() if label != ORIGINAL and v["ok"]}
    ref, checks = check_in_children(src, candidates, feeds_file, str(workdir / "reference.pkl"), cfg.check_timeout)
    if not ref.ok:
        variants[ORIGINAL].update(ok=False, error=f"reference run: {ref.error}")
    for label, variant in variants.items():
        if label == ORIGINAL:
            variant["match"] = {s: {"ok": ref.ok, "max_abs": 0.0 if ref.ok else None} for s in _sets(feeds_file)}
        elif label not in checks:
            variant["match"] = {}
        else:
            res = checks[label]
            variant["match"] = res.value if res.ok else {s: {"ok": False, "error": res.error} for s in
                                                           _sets(feeds_file)}
        variant["matched"] = bool(variant["match"]) and all(m["ok"] for m in variant["match"].values())


def _sets(feeds_file: str) -> list[str]:
    import pickle

    with open(feeds_file, "rb") as f:
        return list(pickle.load(f))


def _measure_latency(variants: dict[str, dict[str, Any]], feeds_file: str, cfg: BenchConfig) -> None:
    """Every output that runs, at both levels, interleaved in one process on the primary inputs.

    When all those sessions would not fit in memory (full-size models: one session per variant and level),
    or that process dies, each level gets its own process; the variants are still interleaved within it.
    """
    import pickle

    with open(feeds_file, "rb") as f:
        primary = pickle.load(f)[PRIMARY]
    primary_file = feeds_file.replace("feeds.pkl", "feeds_primary.pkl")
    with open(primary_file, "wb") as f:
        pickle.dump(primary, f)
    models = {label: v["path"] for label, v in variants.items()
              if v["ok"] and (label == ORIGINAL or v.get("match", {}).get(PRIMARY, {}).get("verdicts"))}
    need = sum(variants[label]["stats"]["file_bytes"] for label in models) * SESSION_BYTES_PER_FILE_BYTE
    together = need * len(LEVELS) < _available_bytes() * 0.6
    for variant in variants.values():
        variant["latency"] = {}
    if together:
        res = _latency_child(models, primary_file, list(LEVELS), cfg)
        if res.ok or res.timed_out:
            _store_latency(variants, list(LEVELS), res)
            return
        log.info("  latency with all sessions in one process failed (%s); one process per level", res.error)
    for level in LEVELS:
        _store_latency(variants, [level], _latency_child(models, primary_file, [level], cfg))


def _latency_child(models: Mapping[str, str], feeds_file: str, levels: list[str], cfg: BenchConfig) -> Any:
    return run_in_child("tools.bench.latency:ort_latency",
                        {"models": dict(models), "feeds_file": feeds_file, "levels": levels,
                         "runs": cfg.latency_runs, "warmup": cfg.warmup},
                        timeout=cfg.check_timeout, preload=("onnxruntime",))


def _store_latency(variants: dict[str, dict[str, Any]], levels: list[str], res: Any) -> None:
    for label, variant in variants.items():
        for level in levels:
            ran = res.ok and label in res.value
            variant["latency"][level] = res.value[label][level] if ran else {"error": res.error or "not run"}
            variant["latency"][level]["interleaved_with"] = levels


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def verdict(variants: Mapping[str, Mapping[str, Any]], subject: str = "graphopt") -> dict[str, Any]:
    """Who has the fewest nodes (total, subgraphs included) among the tools that succeeded and matched,
    and whether ``subject`` (a graphopt variant) is at or below the best peer (the non-graphopt tools)."""

    def nodes(label: str) -> int:
        return variants[label]["stats"]["nodes_total"]

    good = [label for label in variants if label != ORIGINAL and variants[label]["ok"] and variants[label]["matched"]]
    peers = [label for label in good if label not in GRAPHOPT]
    ok = subject in good
    best = min((nodes(label) for label in good), default=None)
    peer_min = min((nodes(label) for label in peers), default=None)
    return {
        "min_nodes": best,
        "min_tools": [label for label in good if nodes(label) == best],
        "peer_min_nodes": peer_min,
        "nodes": nodes(subject) if subject in variants and variants[subject]["ok"] else None,
        "matched": ok,
        "le_peers": ok and (peer_min is None or nodes(subject) <= peer_min),
        "strictly_lower": ok and peer_min is not None and nodes(subject) < peer_min,
        "peers_ok_but_failed": [] if ok else peers,
    }


# ---------------------------------------------------------------------------------------------- zoo


def zoo_names(only: Sequence[str] | None, full: bool) -> list[str]:
    from tools.zoo import MODELS, small_models

    if only:
        unknown = [n for n in only if n not in MODELS]
        if unknown:
            raise SystemExit(f"unknown zoo models {unknown}; known: {', '.join(MODELS)}")
        return list(only)
    return small_models() + ([m.name for m in MODELS.values() if m.full_size] if full else [])


def zoo_feed_sets(name: str) -> dict[str, dict[str, Any]]:
    """The zoo's inputs at the default shape, plus a second shape for dynamic models."""
    from tools.zoo import MODELS, make_inputs

    model = MODELS[name]
    sets = {PRIMARY: make_inputs(model)}
    if model.is_dynamic:
        sets[SECOND] = make_inputs(model, second=True, seed=1)
    return sets


def bench_zoo(names: Sequence[str], workdir: Path, cfg: BenchConfig, json_path: str | None) -> list[dict]:
    from tools.zoo import build

    results = []
    for name in names:
        log.info("%s", name)
        start = time.perf_counter()
        try:
            path = build(name).resolve()
        except Exception as exc:  # noqa: BLE001 - a zoo model that cannot be built is a row, not a stop
            results.append({"model": name, "error": f"zoo build failed: {exc}"})
            continue
        results.append(bench_model(name, path, zoo_feed_sets(name), workdir, cfg))
        log.info("%s done in %.0f s", name, time.perf_counter() - start)
        if json_path:  # partial results survive an interrupted long run
            write_json(json_path, {"models": results})
    return results


# ----------------------------------------------------------------------------------------- synthetic


def bench_synthetic(target_nodes: int, workdir: Path, timeout: float, tools: Sequence[str]) -> dict[str, Any]:
    """Build a ~``target_nodes`` transformer stack and time each tool once on it (graphopt first)."""
    import onnx

    from tools.bench.synthetic import synthetic_inputs, transformer_stack

    folder = workdir.resolve() / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    src = (folder / "synthetic.onnx").resolve()
    onnx.save(transformer_stack(target_nodes), str(src))
    out: dict[str, Any] = {"target_nodes": target_nodes, "original": model_stats(src).to_dict(), "tools": {}}
    feeds_file = str(folder / "feeds.pkl")
    write_feeds(feeds_file, {PRIMARY: synthetic_inputs(1), SECOND: synthetic_inputs(3, seed=1)})
    for tool in tools:
        dst = folder / tool / "model.onnx"
        log.info("synthetic: %s", tool)
        res = run_in_child("tools.bench.simplifiers:run_tool",
                           {"tool": tool, "src": str(src), "dst": str(dst), "options": {"external_data": False}},
                           timeout=timeout, preload=TOOLS[tool][1])
        entry: dict[str, Any] = {"ok": res.ok, "error": res.error, "timed_out": res.timed_out,
                                 "seconds": res.seconds, "peak_rss_mb": res.peak_rss_mb,
                                 "rss_above_baseline_mb": res.rss_above_baseline_mb}
        if res.ok:
            entry["stats"] = model_stats(dst).to_dict()
        out["tools"][tool] = entry
        log.info("synthetic: %s %s", tool, f"{res.seconds:.1f} s" if res.ok else res.error)
    candidates = {tool: str(folder / tool / "model.onnx") for tool, entry in out["tools"].items() if entry["ok"]}
    ref, checks = check_in_children(str(src), candidates, feeds_file, str(folder / "reference.pkl"), timeout)
    out["reference_error"] = ref.error
    for tool, check in checks.items():
        out["tools"][tool]["match"] = check.value if check.ok else {"error": check.error}
    return out


# ------------------------------------------------------------------------------------------- report


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's targets as numbers and one line each, for each graphopt variant."""
    done = [r for r in results if "variants" in r]
    summary: dict[str, Any] = {"models": len(done), "lines": []}
    for subject in GRAPHOPT:
        rows = [r for r in done if subject in r["verdict"]]
        if not rows:
            continue
        part = _summary_for(subject, rows)
        summary[subject] = part
        summary["lines"] += part["lines"]
    if done:
        largest = max(done, key=lambda r: r["variants"][ORIGINAL].get("stats", {}).get("file_bytes", 0))
        for subject in GRAPHOPT:
            if subject in largest["variants"]:
                summary.setdefault("largest", {})[subject] = _largest(largest, subject)
                summary["lines"].append(summary["largest"][subject]["line"])
    return summary


def _summary_for(subject: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    v = {r["model"]: r["verdict"][subject] for r in rows}
    le = [m for m, x in v.items() if x["le_peers"]]
    lower = [m for m, x in v.items() if x["strictly_lower"]]
    matched = [m for m, x in v.items() if x["matched"]]
    regressions = {m: x["peers_ok_but_failed"] for m, x in v.items() if x["peers_ok_but_failed"]}
    lines = [
        f"{subject} <= min(peers) on {len(le)}/{n} models, strictly lower on {len(lower)}/{n}",
        f"{subject}: outputs match on {len(matched)}/{n} (primary and second shape)",
        f"no model where a peer succeeds and {subject} fails" if not regressions else
        f"models where a peer succeeds and {subject} fails: "
        + ", ".join(f"{m} ({', '.join(p)})" for m, p in regressions.items()),
    ]
    return {"le_peers": le, "strictly_lower": lower, "matched": matched, "peers_ok_but_failed": regressions,
            "lines": lines}


def _largest(result: Mapping[str, Any], subject: str) -> dict[str, Any]:
    variants = result["variants"]
    go = variants.get(subject, {})
    peers = {t: v for t, v in variants.items() if t not in (ORIGINAL, *GRAPHOPT) and v["ok"]}
    out: dict[str, Any] = {"model": result["model"]}
    if not go.get("ok") or not peers:
        out["line"] = f"largest model {result['model']}: {subject} {'failed' if not go.get('ok') else 'has no peer'}"
        return out
    fastest = min(peers, key=lambda t: peers[t]["seconds_median"])
    leanest = min(peers, key=lambda t: peers[t]["peak_rss_mb"])
    out.update(
        fastest_peer=fastest, leanest_peer=leanest,
        time_ratio=go["seconds_median"] / peers[fastest]["seconds_median"],
        rss_ratio=go["peak_rss_mb"] / peers[leanest]["peak_rss_mb"],
    )
    above = {t: v["rss_above_baseline_mb"] for t, v in [*peers.items(), (subject, go)]}
    out["line"] = (
        f"largest model {result['model']}: {subject} {go['seconds_median']:.2f} s vs fastest peer {fastest} "
        f"{peers[fastest]['seconds_median']:.2f} s ({out['time_ratio']:.2f}x); peak RSS {go['peak_rss_mb']:.0f} MB "
        f"vs lowest {leanest} {peers[leanest]['peak_rss_mb']:.0f} MB ({out['rss_ratio']:.2f}x); above the "
        f"after-import baseline {subject} {above[subject]:.0f} MB, peers {_fmt_mb(above, exclude=subject)}"
    )
    return out


def _fmt_mb(values: Mapping[str, float], exclude: str) -> str:
    return ", ".join(f"{t} {v:.0f}" for t, v in sorted(values.items(), key=lambda kv: kv[1]) if t != exclude)


def _status(variant: Mapping[str, Any]) -> str:
    if variant.get("timed_out"):
        return "timeout"
    if not variant.get("ok"):
        return "error"
    match = variant.get("match") or {}
    if not match.get(PRIMARY, {}).get("ok"):
        return "load" if "cannot load" in str(match.get(PRIMARY, {}).get("error")) else "diff"
    if SECOND in match and not match[SECOND]["ok"]:
        return "2nd-shape"
    return "ok"


def _nodes_cell(variant: Mapping[str, Any], best: int | None) -> str:
    if "stats" not in variant:
        return _status(variant)
    total = variant["stats"]["nodes_total"]
    top = variant["stats"]["nodes"]
    count = f"{top}+{total - top}" if total != top else str(total)
    count = f"**{count}**" if total == best and _status(variant) == "ok" else count
    return f"{count} / {_status(variant)}"


def render_markdown(results: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                    synthetic: Mapping[str, Any] | None) -> str:
    parts = ["## Simplification benchmark", ""]
    if results:
        parts += [*[f"- {line}" for line in summary["lines"]], "", *_zoo_tables(results)]
    if synthetic:
        parts += render_synthetic(synthetic)
    return "\n".join(parts)


def _zoo_tables(results: Sequence[Mapping[str, Any]]) -> list[str]:
    done = [r for r in results if "variants" in r]
    labels = [ORIGINAL, *[t for t in TOOL_ORDER if any(t in r["variants"] for r in done)]]
    parts: list[str] = []
    parts += ["### Nodes / status (total nodes; `a+b` = a top-level + b in subgraphs; **bold** = fewest among "
              "matching tools; `2nd-shape` = wrong at the second input shape)", ""]
    subjects = [s for s in GRAPHOPT if any(s in r["verdict"] for r in done)]
    rows = [[r["model"], *[_nodes_cell(r["variants"][t], _min_nodes(r)) if t in r["variants"] else "-"
                           for t in labels],
             *[_le_cell(r["verdict"].get(s)) for s in subjects]]
            for r in done]
    rows += [[r["model"], r["error"]] + [""] * (len(labels) + len(subjects) - 1)
             for r in results if "variants" not in r]
    parts += [table(["model", *labels, *[f"{s} <= peers" for s in subjects]], rows), ""]
    parts += ["### Tool wall time, median of runs (s) / peak RSS (MB)", ""]
    tools = labels[1:]
    rows = [[r["model"], *[_time_cell(r["variants"].get(t, {})) for t in tools]] for r in done]
    parts += [table(["model", *tools], rows), ""]
    parts += ["### Max abs difference vs the original (primary shape; second shape)", ""]
    rows = [[r["model"], *[_diff_cell(r["variants"].get(t, {})) for t in tools]] for r in done]
    parts += [table(["model", *tools], rows), ""]
    parts += ["### onnxruntime latency, median ms: ORT_DISABLE_ALL / ORT_ENABLE_ALL (interleaved)", ""]
    rows = [[r["model"], *[_latency_cell(r["variants"].get(t, {})) for t in labels]] for r in done]
    parts += [table(["model", *labels], rows), ""]
    if any("†" in cell for row in rows for cell in row):
        parts += ["† too large to hold every session at once: each level ran in its own process (the variants "
                  "are interleaved within a level; compare across levels with care)", ""]
    errors = [f"- {r['model']} / {t}: {v.get('error') or _match_error(v)}" for r in done
              for t, v in r["variants"].items() if _status(v) != "ok"]
    if errors:
        parts += ["### Failures", "", *errors, ""]
    return parts


def _min_nodes(result: Mapping[str, Any]) -> int | None:
    return next(iter(result["verdict"].values()))["min_nodes"] if result["verdict"] else None


def _le_cell(v: Mapping[str, Any] | None) -> str:
    if v is None:
        return "-"
    return ("yes" if v["le_peers"] else "no") + (" (<)" if v["strictly_lower"] else "")


def _time_cell(variant: Mapping[str, Any]) -> str:
    if not variant.get("ok"):
        return _status(variant) if variant else "-"
    return f"{variant['seconds_median']:.2f} / {variant['peak_rss_mb']:.0f}"


def _diff_cell(variant: Mapping[str, Any]) -> str:
    match = variant.get("match") or {}
    if not match:
        return _status(variant) if variant else "-"
    return "; ".join(_fmt_abs(m.get("max_abs")) if m.get("error") is None or m.get("max_abs") is not None
                     else "fail" for m in match.values())


def _fmt_abs(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else ("inf" if math.isinf(value) else f"{value:.1e}")


def _latency_cell(variant: Mapping[str, Any]) -> str:
    lat = variant.get("latency") or {}
    vals = [lat.get(level, {}).get("median_ms") for level in LEVELS]
    split = any(len(lat.get(level, {}).get("interleaved_with", LEVELS)) < len(LEVELS) for level in LEVELS)
    cell = " / ".join("-" if v is None else f"{v:.3g}" for v in vals) if any(vals) else "-"
    return cell + (" †" if split and any(vals) else "")


def _match_error(variant: Mapping[str, Any]) -> str:
    """The failed input sets and their errors, each distinct error once."""
    by_error: dict[str, list[str]] = {}
    for name, m in (variant.get("match") or {}).items():
        if not m.get("ok"):
            by_error.setdefault(str(m.get("error")), []).append(name)
    return "; ".join(f"{' and '.join(names)}: {error}" for error, names in by_error.items())


def render_synthetic(syn: Mapping[str, Any]) -> list[str]:
    orig = syn["original"]
    parts = [f"### Synthetic transformer stack ({orig['nodes']} nodes, {orig['file_bytes'] / 1e6:.1f} MB)", ""]
    rows = []
    for tool, entry in syn["tools"].items():
        match = entry.get("match") or {}
        ok = "timeout" if entry["timed_out"] else (
            "error" if not entry["ok"] else
            ("ok" if match and all(isinstance(m, dict) and m.get("ok") for m in match.values()) else "diff"))
        rows.append([tool, None if entry["seconds"] is None else f"{entry['seconds']:.1f}",
                     orig["nodes"], entry.get("stats", {}).get("nodes"),
                     None if entry["peak_rss_mb"] is None else f"{entry['peak_rss_mb']:.0f}", ok])
    parts += [table(["tool", "load+optimize+save (s)", "nodes before", "nodes after", "peak RSS (MB)",
                     "outputs"], rows), ""]
    for subject in GRAPHOPT:
        go = syn["tools"].get(subject)
        if go and go["ok"]:
            parts.append(f"{subject} on {orig['nodes']} nodes: {go['seconds']:.1f} s (target < 60 s)")
    parts.append("")
    return parts


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated zoo model names (small or full-size)")
    parser.add_argument("--full", action="store_true", help="add the full-size zoo models")
    parser.add_argument("--tools", default=",".join(TOOL_ORDER), help="comma-separated tools to compare")
    parser.add_argument("--repeat", type=int, default=3, help="tool runs per model (median wall time)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per tool run")
    parser.add_argument("--latency-runs", type=int, default=20, help="interleaved onnxruntime runs per variant")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--synthetic", type=int, default=200_000, help="nodes of the synthetic model (0: skip)")
    parser.add_argument("--synthetic-tools", default="graphopt,graphopt_simplify,onnxslim,onnxscript")
    parser.add_argument("--synthetic-timeout", type=float, default=300, help="seconds per tool")
    parser.add_argument("--no-zoo", action="store_true", help="only the synthetic test")
    parser.add_argument("--workdir", help="keep tool outputs here (default: a temporary folder)")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--md", help="write the markdown report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = [t for t in args.tools.split(",") if t]
    if unknown := [t for t in tools if t not in TOOLS]:
        raise SystemExit(f"unknown tools {unknown}; known: {', '.join(TOOLS)}")
    cfg = BenchConfig(tools=tools, repeat=args.repeat, timeout=args.timeout, latency_runs=args.latency_runs,
                      latency=not args.no_latency)
    with tempfile.TemporaryDirectory(prefix="bench-simplify-") as tmp:
        workdir = Path(args.workdir or tmp)
        names = [] if args.no_zoo else zoo_names(args.only.split(",") if args.only else None, args.full)
        results = bench_zoo(names, workdir, cfg, args.json)
        synthetic = None
        if args.synthetic > 0:
            synthetic = bench_synthetic(args.synthetic, workdir, args.synthetic_timeout,
                                        [t for t in args.synthetic_tools.split(",") if t])
    summary = summarize(results)
    report = render_markdown(results, summary, synthetic)
    print(report)
    if args.md:
        Path(args.md).write_text(report + "\n")
    if args.json:
        write_json(args.json, {"config": vars(args), "summary": summary, "models": results, "synthetic": synthetic})


if __name__ == "__main__":
    main()
