"""FedExP without installing the package: ``fedsim run SCENARIO --plugin examples/fedsim-fedexp/fedexp_plugin.py``.

fedsim imports this file under its own name (``fedexp_plugin``) in the driver and, through ``FEDSIM_PLUGINS``, in
every process it starts; it puts the package's ``src`` folder (beside this file) on ``sys.path`` and imports the
protocol, which registers the strategy ``fedexp``. Installed (``pip install -e examples/fedsim-fedexp``), the
``fedsim.plugins`` entry point does the same and this file is not needed.
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.append(_SRC)  # appended: an installed fedsim_fedexp, where there is one, is the one imported

import fedsim_fedexp.protocol  # noqa: E402,F401  (registers "fedexp")
