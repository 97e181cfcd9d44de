"""``python -m tools.zoo [--full] [--only NAME,...] [--list] [--force]``: build the zoo, print a table."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rich.console import Console
from rich.table import Table

from . import MODELS, ZooSkipError, build, info, is_built, small_models

log = logging.getLogger("tools.zoo")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.zoo", description=__doc__)
    parser.add_argument("--full", action="store_true", help="also build the full-size models (slow, GBs)")
    parser.add_argument("--only", type=lambda s: [n for n in s.split(",") if n], help="comma-separated names")
    parser.add_argument("--list", action="store_true", help="list the models without building anything")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    return parser.parse_args(argv)


def _selected(args: argparse.Namespace) -> list[str]:
    if args.only:
        unknown = [n for n in args.only if n not in MODELS]
        if unknown:
            raise SystemExit(f"unknown zoo model(s): {', '.join(unknown)}; see --list")
        return args.only
    return list(MODELS) if args.full else small_models()


def _list_table(names: list[str]) -> Table:
    table = Table(title="graphopt model zoo")
    for col in ("name", "family", "exporter", "full", "tags", "inputs", "built"):
        table.add_column(col)
    for name in names:
        m = MODELS[name]
        shapes = ", ".join(f"{k}{list(s.shape)}" for k, s in m.inputs.items())
        table.add_row(
            name,
            m.family,
            m.exporter,
            "yes" if m.full_size else "",
            ",".join(sorted(m.tags)),
            shapes,
            "yes" if is_built(name) else "",
        )
    return table


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def _build_all(names: list[str], force: bool) -> tuple[Table, list[str]]:
    table = Table(title="graphopt model zoo")
    for col in ("name", "exporter", "nodes", "nodes (all)", "params", "size", "build s", "this run s", "note"):
        table.add_column(col, justify="left" if col in ("name", "exporter", "note") else "right")
    failed = []
    for name in names:
        start = time.perf_counter()
        try:
            build(name, force=force)
        except ZooSkipError as err:
            table.add_row(name, MODELS[name].exporter, "", "", "", "", "", "", f"skipped: {err}")
            continue
        except Exception:
            log.exception("zoo: building %s failed", name)
            failed.append(name)
            table.add_row(name, MODELS[name].exporter, "", "", "", "", "", "", "FAILED (see log)")
            continue
        meta = info(name)
        note = f"acc {meta['test_accuracy']:.3f}" if "test_accuracy" in meta else ""
        table.add_row(
            name,
            meta["exporter"],
            str(meta["nodes"]),
            str(meta["nodes_total"]),
            f"{meta['params']:,}",
            _size(meta["file_bytes"]),
            f"{meta['build_seconds']:.1f}",
            f"{time.perf_counter() - start:.1f}",
            note,
        )
    return table, failed


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = _selected(args)
    console = Console()
    if not console.is_terminal:  # keep the table readable in logs and pipes
        console = Console(width=160)
    if args.list:
        console.print(_list_table(names))
        return 0
    table, failed = _build_all(names, args.force)
    console.print(table)
    if failed:
        log.error("zoo: %d model(s) failed: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
