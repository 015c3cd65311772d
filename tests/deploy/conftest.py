"""Fixtures of the deploy tests (tests/deploy/tools.py has the helpers)."""

from deploy.tools import dists

__all__ = ["dists"]
