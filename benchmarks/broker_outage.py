"""Broker outages on durable storage (fault tests 3 and 6): see :mod:`recsys.testing.outage`.

python benchmarks/broker_outage.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.testing.outage import main

if __name__ == "__main__":
    sys.exit(main())
