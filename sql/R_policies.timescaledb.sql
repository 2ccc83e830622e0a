-- Re-applied by `revline migrate` whenever a setting changes: the file is rendered with
-- them (each double-braced name becomes a SQL literal, NULL for "forever"). Remove-then-add
-- makes it idempotent.
INSERT INTO revline_settings (key, value) VALUES
    ('chunk_interval', {{chunk_interval}}),
    ('compress_after', {{compress_after}}),
    ('raw_retention', {{raw_retention}}),
    ('rollup_1m_retention', {{rollup_1m_retention}}),
    ('rollup_1h_retention', {{rollup_1h_retention}}),
    ('rollup_refresh_window', {{rollup_refresh_window}}),
    ('partitions_ahead', {{partitions_ahead}})
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now();

SELECT set_chunk_time_interval('samples', {{chunk_interval}}::interval);

SELECT remove_compression_policy('samples', if_exists => true);
SELECT add_compression_policy('samples', {{compress_after}}::interval);

-- The refresh window reaches back so that a car that was offline for days still shows up in the
-- rollups; only invalidated buckets are recomputed, so a wide window costs little.
SELECT remove_continuous_aggregate_policy('samples_1m', if_exists => true);
SELECT add_continuous_aggregate_policy('samples_1m',
    start_offset => {{rollup_refresh_window}}::interval,
    end_offset => interval '1 minute',
    schedule_interval => interval '1 minute');
SELECT remove_continuous_aggregate_policy('samples_1h', if_exists => true);
SELECT add_continuous_aggregate_policy('samples_1h',
    start_offset => {{rollup_refresh_window}}::interval,
    end_offset => interval '1 hour',
    schedule_interval => interval '30 minutes');

SELECT remove_retention_policy('samples', if_exists => true);
SELECT remove_retention_policy('samples_1m', if_exists => true);
SELECT remove_retention_policy('samples_1h', if_exists => true);
SELECT add_retention_policy(relation, value::interval)
FROM (VALUES ('samples', {{raw_retention}}),
             ('samples_1m', {{rollup_1m_retention}}),
             ('samples_1h', {{rollup_1h_retention}})) AS p (relation, value)
WHERE value IS NOT NULL;
