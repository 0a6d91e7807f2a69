"""Drift detection on real data (OBD, reward rate halved halfway): see :mod:`recsys.testing.drift`.

python benchmarks/drift_detection.py --seeds 20 --json drift.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.testing.drift import main

if __name__ == "__main__":
    sys.exit(main())
