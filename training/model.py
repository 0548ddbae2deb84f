"""Moved: the two-tower model lives in core, `annomine.two_tower` (evaluation loads it too).

This alias stays for MLflow pyfunc models logged before the move, whose pickled `load_context` runs
`from training.model import TwoTower`. New code imports `annomine.two_tower`.
"""

from annomine.two_tower import META_FILE, TwoTower, parse_tiny

__all__ = ["META_FILE", "TwoTower", "parse_tiny"]
