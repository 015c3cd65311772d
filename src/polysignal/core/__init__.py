"""The part of polysignal with no I/O: registries, limits, errors (docs/architecture.md)."""
