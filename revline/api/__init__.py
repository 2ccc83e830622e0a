"""The HTTP API: reads, live streams and ingest for programs (``revline api``)."""
