"""`python -m benchmarks [--quick] [--sections 1,2,...] [--json PATH] [--repeats N]`.

Prints one table per section and the targets with their measured ratios and
pass/fail; `--json` writes everything (rows, targets, raw info, machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax

from benchmarks import compile_time, deep_chain, eager, forward, jit_step
from benchmarks._util import cores, fmt_s, torch_threads

SECTIONS = {
    "jit_step": jit_step,
    "compile_time": compile_time,
    "eager": eager,
    "deep_chain": deep_chain,
    "forward": forward,
}
ALIASES = {"1": "jit_step", "2": "compile_time", "3": "eager", "4": "deep_chain", "5": "forward"}


def machine() -> dict:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cores": cores(),
        "loadavg_at_start": os.getloadavg(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch_version,
        "torch_threads": torch_threads(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _cell(v, kind: str = "") -> str:
    if v is None or v is False:
        return "-"
    if kind == "time":
        return fmt_s(v)
    if kind == "pct":
        return f"{v:.0%}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


COLUMNS = [
    ("case", "case", ""),
    ("contender", "contender", ""),
    ("time", "median", "time"),
    ("spread", "IQR/med", "pct"),
    ("ratio_vs_jax", "/jax.grad (paired)", ""),
    ("ratio_spread", "ratio IQR", "pct"),
    ("ratio_vs_torch", "/torch", ""),
    ("gflops", "GFLOP/s", ""),
    ("pct_of_matmul_peak", "% mm peak", ""),
    ("xla_flops", "XLA flops", ""),
    ("hlo_ops", "HLO ops", ""),
    ("trace_s", "trace", "time"),
    ("lower_s", "lower", "time"),
    ("compile_s", "compile", "time"),
    ("per_layer", "per layer", "time"),
    ("us_per_op", "us/op", ""),
    ("mem_growth_mib", "peak+ MiB", ""),
    ("kib_per_op", "KiB/op", ""),
    ("time_vs_smaller_n", "t / t(prev N)", ""),
    ("note", "note", ""),
]


def table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) not in (None, "", False) for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([_cell(r.get(k), kind) for k, _, kind in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    lines = ["| target | measured | limit | result |", "|---|---|---|---|"]
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        result = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['name']} | {value} | {t['op']} {t['limit']:g} | {result}{note} |")
    return "\n".join(lines)


def run_child(name: str, quick: bool, repeats: int | None) -> dict:
    """Runs one section in a fresh interpreter, so sections cannot disturb each other."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks", "--child", name]
    cmd += ["--quick"] * quick + (["--repeats", str(repeats)] if repeats else [])
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"section {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke run)")
    p.add_argument(
        "--sections",
        default="jit_step,compile_time,eager,deep_chain,forward",
        help="comma-separated: jit_step,compile_time,eager,deep_chain,forward (or 1,...,5)",
    )
    p.add_argument("--repeats", type=int, default=None, help="override repeats per measurement")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every section in this process (default: one fresh subprocess per section, "
        "because XLA's and PyTorch's CPU thread pools slow each other down once both exist)",
    )
    p.add_argument("--child", metavar="SECTION", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # run one section for the parent and print its JSON
        res = SECTIONS[args.child].run(quick=args.quick, repeats=args.repeats)
        print(json.dumps(res, default=str))
        return res
    names = [ALIASES.get(s.strip(), s.strip()) for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    result = {
        "machine": machine(),
        "quick": args.quick,
        "isolated_sections": not args.in_process,
        "sections": {},
    }
    print(f"# chainrule benchmarks ({'quick' if args.quick else 'full'})")
    print(f"machine: {result['machine']}\n")
    for name in names:
        t0 = time.perf_counter()
        if args.in_process:
            res = SECTIONS[name].run(quick=args.quick, repeats=args.repeats)
        else:
            try:
                res = run_child(name, args.quick, args.repeats)
            except RuntimeError as e:  # report the other sections anyway
                print(e, file=sys.stderr)
                res = {"name": name, "rows": [], "targets": [], "info": {}, "error": str(e)}
        res["wall_s"] = time.perf_counter() - t0
        result["sections"][name] = res
        print(f"## {res['name']}  ({res['wall_s']:.0f} s)\n")
        print(table(res["rows"]))
        print()
        print(targets_table(res["targets"]))
        print(flush=True)
    all_targets = [t for s in result["sections"].values() for t in s["targets"]]
    result["summary"] = {
        "passed": sum(t["pass"] is True for t in all_targets),
        "failed": sum(t["pass"] is False for t in all_targets),
        "not_measured": sum(t["pass"] is None for t in all_targets),
    }
    print(f"targets: {result['summary']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    report = main(sys.argv[1:])
    sys.exit(1 if any("error" in s for s in report.get("sections", {}).values()) else 0)
