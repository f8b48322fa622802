"""The tests as a package, so one module runs from the repository root: python3 -m unittest tests.test_routes.

The modules import their helpers as `support` (discover -s tests puts this folder on the path); so does this.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
