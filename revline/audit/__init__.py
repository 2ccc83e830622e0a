"""Loss you can see: per-vehicle sequence accounting, device reports, broker drops, gap repair
and ``revline audit`` (docs/audit.md). Imports the storage part and the core only."""
