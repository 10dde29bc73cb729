"""Importing this puts the checkout root on ``sys.path``, so that a script run as
``python scripts/<name>.py`` can import the training application (``training/`` lives in the
checkout and is not installed, like the official repository's training folder)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
