"""Resident memory of a compression over time, with its phases marked.

    python benchmarks/memory_timeline.py SRC [--out OUT] [--set budget=300000] [--every 0.25]

``lorazip.compress(load_collection(SRC), **settings)`` (no settings: the default, mean error 0.03
with the fewest bytes), then ``save`` to OUT (default: a temporary file, removed after), in this
process, with resident memory (``VmRSS`` of ``/proc/self/status``, Linux) and its anonymous part
(``RssAnon``: what the kernel cannot drop; file-backed pages, such as a spilled artifact's mapped
codes, are the rest) sampled every ``--every`` seconds by a thread. Prints when pass 1, the
allocations, the builds and the save start and end (seconds, MiB), the peaks and about 40 samples of
the timeline. Not a timed test.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import tempfile
import threading
import time

from default_phases import settings_from  # benchmarks/ is on the path of a script run from it


def _status_mib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    return 0


def _rss_mib() -> int:
    return _status_mib("VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--every", type=float, default=0.25)
    args = ap.parse_args()
    settings = settings_from(args.set)

    import lorazip
    from lorazip.artifact import Artifact

    t0 = time.perf_counter()
    samples, marks = [], []

    def sample() -> None:
        while True:
            samples.append((time.perf_counter() - t0, _rss_mib(), _status_mib("RssAnon")))
            time.sleep(args.every)

    threading.Thread(target=sample, daemon=True).start()

    def marked(owner, name: str) -> None:
        real = getattr(owner, name)

        def wrapper(*a, **k):
            marks.append((time.perf_counter() - t0, f"start {name}", _rss_mib(), _status_mib("RssAnon")))
            try:
                return real(*a, **k)
            finally:
                marks.append((time.perf_counter() - t0, f"end {name}", _rss_mib(), _status_mib("RssAnon")))

        setattr(owner, name, wrapper)

    budget = importlib.import_module("lorazip.compress.budget")
    marked(budget._MixedRun, "fit")
    marked(budget, "_allocate_to_size")
    marked(budget, "build_allocation")
    marked(Artifact, "save")
    art = lorazip.compress(lorazip.load_collection(args.source), **settings)
    out = args.out or os.path.join(tempfile.mkdtemp(), "timeline.lorazip.safetensors")
    art.save(out, overwrite=True)
    if args.out is None:
        os.remove(out)
    for t, what, mib, anon in marks:
        print(f"{t:8.1f} s  {what:28s} {mib:>7,} MiB (anonymous {anon:,})")
    peak = max(samples, key=lambda s: s[1])
    peak_anon = max(samples, key=lambda s: s[2])
    most = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"peak {peak[1]:,} MiB at {peak[0]:.1f} s (ru_maxrss {most:,} MiB); "
          f"anonymous peak {peak_anon[2]:,} MiB at {peak_anon[0]:.1f} s")
    step = max(1, len(samples) // 40)
    print("timeline (s, MiB, anonymous MiB):", [(round(t, 1), m, a) for t, m, a in samples[::step]])


if __name__ == "__main__":
    main()
