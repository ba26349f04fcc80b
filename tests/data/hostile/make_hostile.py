"""Writes the hand-written hostile corpus (``fuzz/hostile.py``) into this folder,
with ``expected.json`` naming the typed error each file must give.

    python tests/data/hostile/make_hostile.py

Regenerating is deterministic and harmless; files found by fuzzing are kept
next to them as ``fuzz-*.bin`` (see fuzz/README.md) and are never regenerated.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))

from fuzz import hostile  # noqa: E402

if __name__ == "__main__":
    hostile.write(HERE)
