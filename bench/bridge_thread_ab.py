"""Before/after for the bridge: bench/store_call_bench.py (a real PgStore.ping) on a
trio-asyncio tree and on this one, alternating in one session, since this VM's speed
varies by the minute. "after" runs this tree's thread bridge on uvloop; "after_asyncio"
the same bridge on the stdlib loop (is uvloop worth a dependency?).

    .venv/bin/python bench/bridge_thread_ab.py --before /tmp/bridge-before [--rounds 3]

`--before` is a checkout of the trio-asyncio bridge (`git archive 7ed465e | tar -x -C
DIR`), run with this venv. Raw output goes to bench/results/bridge-thread-<UTC>.txt.
Note CPU is time.process_time(): with the thread bridge it counts both threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ASYNCIO = (
    "import sys, asyncio; sys.argv = ['store_call_bench'] + sys.argv[1:]; "
    "sys.path.insert(0, '.'); from daemon.store import bridge; "
    "bridge._new_loop = asyncio.SelectorEventLoop; "
    "from bench import store_call_bench as b; b.main()"
)


def run(tree: Path, variant: str, calls: int, reps: int) -> list[dict[str, float]]:
    args = ["--calls", str(calls), "--reps", str(reps), "--json"]
    if variant == "after_asyncio":
        cmd = [sys.executable, "-c", _ASYNCIO, *args]
    else:
        cmd = [sys.executable, str(tree / "bench" / "store_call_bench.py"), *args]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True, timeout=900)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="before,after,after_asyncio")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = ROOT / "bench" / "results" / f"bridge-thread-{stamp}.txt"
    lines = [f"# {' '.join(sys.argv)}", f"# before={args.before} after={ROOT}"]
    cpu: dict[str, list[float]] = {}
    for rnd in range(1, args.rounds + 1):
        for variant in args.variants.split(","):
            tree = args.before if variant == "before" else ROOT
            reps = run(tree, variant, args.calls, args.reps)
            med = statistics.median(r["cpu_us"] for r in reps)
            cpu.setdefault(variant, []).append(med)
            line = (f"round {rnd} {variant:14s} cpu us/call "
                    + " ".join(f"{r['cpu_us']:.1f}" for r in reps)
                    + "  wall us/call " + " ".join(f"{r['wall_us']:.1f}" for r in reps)
                    + f"  median cpu {med:.1f}")
            print(line, flush=True)
            lines.append(line)
    for variant, meds in cpu.items():
        line = f"{variant:14s} median of round medians {statistics.median(meds):.1f} us/call"
        print(line)
        lines.append(line)
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
