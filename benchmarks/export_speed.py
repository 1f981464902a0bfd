"""Time ``lorazip export`` against the ``lorazip compress --rank 16`` that made its artifact.

    python benchmarks/export_speed.py [examples/fortunes/adapters] [--repeats 3] [--dtype float32]

Each run is a fresh process of the installed ``lorazip`` command (what a user waits for: start-up,
imports, work, exit); wall time from the parent, peak RSS from the child's own rusage
(``os.wait4``), with its CPU time (user + system: less disturbed than wall time on a shared
machine). Per repeat: ``compress SRC -o A --rank 16 --overwrite``, then ``export A OUT`` into
a new folder, then the torch export of the library (``lorazip.export``, what the command ran before
it went torch-free) for reference. Prints a table (median, min and max wall of the repeats; the
largest peak RSS) and the ratio of the export's median wall to the compression's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lorazip_command() -> list[str]:
    here = Path(sys.executable).parent / "lorazip"  # the console script beside this interpreter
    if here.exists():
        return [str(here)]
    found = shutil.which("lorazip")
    if found:
        return [found]
    return [sys.executable, "-c", "from lorazip.cli.main import entry; entry()"]


def timed(argv: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one child process; exits if it fails."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if status != 0:
        sys.exit(f"failed ({status}): {' '.join(argv)}\n{err}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", default=str(ROOT / "examples" / "fortunes" / "adapters"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="export dtype")
    args = ap.parse_args()
    cli = lorazip_command()
    rows: dict[str, list[tuple[float, float, float]]] = {"compress --rank 16": [], "export (CLI, NumPy)": [],
                                                  "export (library, torch)": []}
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        art = Path(tmp) / "r16.lorazip.safetensors"
        for k in range(args.repeats):
            rows["compress --rank 16"].append(
                timed([*cli, "compress", args.src, "-o", str(art), "--rank", "16", "--overwrite"]))
            rows["export (CLI, NumPy)"].append(
                timed([*cli, "export", str(art), str(Path(tmp) / f"cli-{k}"), "--dtype", args.dtype]))
            code = ("import sys, lorazip; lorazip.export(lorazip.load_artifact(sys.argv[1]), sys.argv[2], "
                    "dtype=sys.argv[3])")
            rows["export (library, torch)"].append(
                timed([sys.executable, "-c", code, str(art), str(Path(tmp) / f"lib-{k}"), args.dtype]))
            print(f"repeat {k + 1}/{args.repeats} done", file=sys.stderr)
        same = all((Path(tmp) / f"cli-{k}" / n / f).read_bytes() == (Path(tmp) / f"lib-{k}" / n / f).read_bytes()
                   for k in range(args.repeats) for n in os.listdir(Path(tmp) / f"cli-{k}")
                   for f in ("adapter_model.safetensors", "adapter_config.json"))
        size = art.stat().st_size
    print(f"{args.src}: {args.repeats} repeats, export dtype {args.dtype}, artifact {size / 1e6:.2f} MB; "
          f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}")
    print(f"CLI and library exports byte-identical: {same}")
    print("| command | wall (median) | min | max | CPU (median) | peak RSS |")
    print("|---|---|---|---|---|---|")
    median, cpu = {}, {}
    for name, runs in rows.items():
        walls = [w for w, _, _ in runs]
        median[name], cpu[name] = statistics.median(walls), statistics.median(c for _, c, _ in runs)
        print(f"| `{name}` | {median[name]:.2f} s | {min(walls):.2f} s | {max(walls):.2f} s | {cpu[name]:.2f} s | "
              f"{max(r for _, _, r in runs):.0f} MB |")
    base, cbase = median["compress --rank 16"], cpu["compress --rank 16"]
    print(f"export / compress, wall: {median['export (CLI, NumPy)'] / base:.2f}x "
          f"(torch export: {median['export (library, torch)'] / base:.2f}x); CPU: "
          f"{cpu['export (CLI, NumPy)'] / cbase:.2f}x (torch export: {cpu['export (library, torch)'] / cbase:.2f}x)")


if __name__ == "__main__":
    main()
