-- Cold table: every sample ever received. OBD values are real (float4): a sensor's resolution is
-- far coarser than float4's 7 digits, and it halves the bytes. lat/lon stay double (float4 is
-- ~2 m off at 180 degrees).
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE samples (
    vin text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    speed real,
    rpm real,
    coolant real,
    intake real,
    throttle real,
    load real,
    maf real,
    fuel real,
    battery real,
    lat double precision,
    lon double precision,
    alt real,
    heading real,
    gps_speed real,
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
