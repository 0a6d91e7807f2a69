"""The reward worker's SIGKILL test: see :mod:`recsys.testing.reward_kill`.

python benchmarks/reward_kill_test.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.testing.reward_kill import main

if __name__ == "__main__":
    sys.exit(main())
