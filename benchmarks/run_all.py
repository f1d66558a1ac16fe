"""``make bench``: run every benchmark script in quick mode, one after another.

Each script prints its figures and a last line of JSON; this runner collects those lines into
``bench-out/summary.json``. Record the figures you quote in BENCHMARKS.md with the command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ("samplers", ["samplers.py", "--quick"]),
    ("privacy", ["privacy.py", "--quick"]),
    ("synth", ["synth.py", "--quick"]),
    ("histograms", ["histograms.py", "--quick"]),
    ("validation", ["validation.py", "--quick"]),
    ("postprocess", ["postprocess.py", "--quick"]),
    ("release", ["release.py", "--quick"]),
    ("review", ["review.py", "--quick"]),
    ("bookkeeping", ["bookkeeping.py", "--shards", "2000", "--repeats", "3"]),
    ("pipeline", ["pipeline.py", "--persons", "1000000", "--repeats", "3"]),
]


def main() -> int:
    out_dir = HERE.parent / "bench-out"
    out_dir.mkdir(exist_ok=True)
    summary: dict[str, object] = {}
    failed = []
    for name, argv in SCRIPTS:
        script = HERE / argv[0]
        if not script.exists():
            print(f"[{name}] missing {script.name}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"== {name}: python benchmarks/{' '.join(argv)}", flush=True)
        res = subprocess.run([sys.executable, str(script), *argv[1:]], cwd=HERE.parent,
                             capture_output=True, text=True)
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr[-4000:])
        lines = [l for l in res.stdout.strip().splitlines() if l.startswith("{")]
        if res.returncode != 0 or not lines:
            failed.append(name)
            continue
        summary[name] = json.loads(lines[-1])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"benchmarks": sorted(summary), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
