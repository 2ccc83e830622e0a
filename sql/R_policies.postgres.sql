-- Re-applied by `revline migrate` whenever a setting changes: the file is rendered with
-- them (each double-braced name becomes a SQL literal, NULL for "forever"). Plain mode has no
-- job scheduler: the maintenance task (revline/storage/maintenance.py) reads these settings.
INSERT INTO revline_settings (key, value) VALUES
    ('chunk_interval', {{chunk_interval}}),
    ('compress_after', {{compress_after}}),
    ('raw_retention', {{raw_retention}}),
    ('rollup_1m_retention', {{rollup_1m_retention}}),
    ('rollup_1h_retention', {{rollup_1h_retention}}),
    ('rollup_refresh_window', {{rollup_refresh_window}}),
    ('partitions_ahead', {{partitions_ahead}})
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now();
