"""Where the tests find the project's shared data: ``shared/`` beside the checkout (as CI lays
it out), overridable with ``USJ_TINYSHAKESPEARE``. The library itself never reads it."""

import os
from pathlib import Path

TINYSHAKESPEARE = Path(os.environ.get(
    "USJ_TINYSHAKESPEARE",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"))
