"""Our engine against TRL (DPOTrainer, CPO/SimPO) on the same work; same as ``mmpo bench vs-trl``.

    python benchmarks/bench_vs_trl.py --threads 1            # both model sizes (~30 min on 2 busy cores)
    python benchmarks/bench_vs_trl.py --sizes tiny --help    # options

Needs the ``bench`` extra (``pip install 'mmpo[bench]'``: trl, psutil). See docs/performance.md.
"""

import sys

from mmpo.bench import main

if __name__ == "__main__":
    sys.exit(main(["vs-trl", *sys.argv[1:]]))
