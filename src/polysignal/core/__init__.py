"""The part of polysignal with no I/O: registries, limits, errors (DESIGN.md §2)."""
