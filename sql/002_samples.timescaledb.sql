-- Cold table: every sample ever received. Each measurement is stored as a scaled integer,
-- `<field>_e<N>` = round(value * 10^N), N finer than the sensor's resolution (COLD_SCALES in
-- revline/consumer/writer.py): smooth integer series compress to about a byte a value, floats to 2-5.
-- Read it in real units through the view samples_decoded (006_decoded.sql).
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE samples (
    vin text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    speed_e1 smallint,
    rpm_e2 integer,
    coolant_e1 smallint,
    intake_e1 smallint,
    throttle_e2 smallint,
    load_e2 smallint,
    maf_e2 integer,
    fuel_e2 smallint,
    battery_e3 integer,
    lat_e7 integer,
    lon_e7 integer,
    alt_e1 integer,
    heading_e1 smallint,
    gps_speed_e1 smallint,
    flags integer NOT NULL DEFAULT 0,
    extra jsonb,
    -- The sample's identity: a redelivered batch inserts nothing (ON CONFLICT DO NOTHING). The
    -- time column must be part of it, a rule of both hypertables and partitioned tables.
    CONSTRAINT samples_identity UNIQUE (vin, ts, seq)
);

-- Chunk interval, compression age and retention are set (and re-set) by R_policies.
SELECT create_hypertable('samples', by_range('ts', interval '1 day'));

-- Segmenting by vehicle keeps one vehicle's rows together, ordered by time, so smooth signals
-- delta-encode into a few bits per value.
ALTER TABLE samples SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'vin',
    timescaledb.compress_orderby = 'ts DESC, seq DESC'
);
