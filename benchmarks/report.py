"""Print the benchmark summary (at most 25 lines) from a pytest-benchmark JSON file, and write the full table.

    python benchmarks/report.py bench-results/benchmarks.json [--full bench-results/report.md]
        [--plot bench-results/summary.png] [--log bench-results/pytest.log] [--load-start 1.7] [--isa AVX512]

The code is ``posenc_dev/bench_summary.py`` (shared with the tests); this file keeps the command beside the
benchmarks.
"""

import sys

from posenc_dev.bench_summary import main

if __name__ == "__main__":
    sys.exit(main())
