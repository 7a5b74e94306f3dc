"""`python -m tracker_svc track VIDEO --out FILE ...` (see tracker_svc.cli).

The package's __init__ sets OMP_WAIT_POLICY before torch loads, which `-m` runs first.
"""

import sys

from tracker_svc.cli import main

sys.exit(main())
