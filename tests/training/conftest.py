"""Puts the repository root (for ``train`` and ``configs``) and this folder (for the helpers) on sys.path."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(os.path.dirname(_HERE)), _HERE):
  if path not in sys.path:
    sys.path.insert(0, path)
