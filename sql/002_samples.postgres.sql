-- Cold table: every sample ever received. Each measurement is stored as a scaled integer,
-- `<field>_e<N>` = round(value * 10^N), N finer than the sensor's resolution (COLD_SCALES in
-- revline/consumer/writer.py): smooth integer series compress to about a byte a value, floats to 2-5.
-- Read it in real units through the view samples_decoded (006_decoded.sql).
-- Plain PostgreSQL: native partitions, one per UTC day, created ahead by revline_ensure_partitions
-- (run by `revline migrate` and the consumer's maintenance task). The DEFAULT partition takes any
-- row with no partition yet, so an insert is never refused; maintenance moves rows out of it.
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
) PARTITION BY RANGE (ts);

CREATE TABLE samples_default PARTITION OF samples DEFAULT;

-- Plain-mode rollups are refreshed from the rows received since the last refresh; received_at
-- grows with insertion order, which is exactly what a BRIN index is cheap and good at.
CREATE INDEX samples_received_at ON samples USING brin (received_at);

-- The partition holding one UTC day; moves that day's rows out of the DEFAULT partition first
-- (ATTACH refuses a range the DEFAULT partition still holds rows of). Returns the rows moved, or
-- NULL when the partition already existed.
CREATE FUNCTION revline_create_partition(day date) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('samples_p%s', to_char(day, 'YYYYMMDD'));
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    moved bigint;
BEGIN
    IF to_regclass(format('%I.%I', current_schema(), part)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Taken first so that no insert routes a row of this day into DEFAULT between the move
    -- and the ATTACH (which needs this lock anyway).
    LOCK TABLE samples_default IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('CREATE TABLE %I (LIKE samples INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    EXECUTE format(
        'WITH m AS (DELETE FROM samples_default WHERE ts >= %L AND ts < %L RETURNING *) '
        'INSERT INTO %I SELECT * FROM m', lo, hi, part);
    GET DIAGNOSTICS moved = ROW_COUNT;
    EXECUTE format('ALTER TABLE samples ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    RETURN moved;
END
$$;

-- Partitions from `back` days ago to `ahead` days ahead (UTC), plus one for every day within the
-- retention period that has rows waiting in DEFAULT (a backfill older than the install).
CREATE FUNCTION revline_ensure_partitions(back integer, ahead integer)
RETURNS TABLE (partition text, moved_rows bigint)
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    retention interval := (SELECT value::interval FROM revline_settings WHERE key = 'raw_retention');
    day date;
    moved bigint;
BEGIN
    FOR day IN
        SELECT d::date FROM generate_series(today - back, today + ahead, interval '1 day') AS d
        UNION
        SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM samples_default
        WHERE ts >= now() - coalesce(retention, interval '100 years')
          AND ts < now() + make_interval(days => ahead + 1)
        ORDER BY 1
    LOOP
        moved := revline_create_partition(day);
        IF moved IS NOT NULL THEN
            partition := format('samples_p%s', to_char(day, 'YYYYMMDD'));
            moved_rows := moved;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- Retention by dropping whole partitions (no vacuum debt), plus the few old rows in DEFAULT.
CREATE FUNCTION revline_drop_partitions(retention interval)
RETURNS TABLE (partition text, dropped_rows bigint)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff date := ((now() - retention) AT TIME ZONE 'UTC')::date;
    part record;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'samples'::regclass AND c.relname ~ '^samples_p[0-9]{8}$'
          AND to_date(substr(c.relname, 10), 'YYYYMMDD') < cutoff
        ORDER BY c.relname
    LOOP
        partition := part.relname;
        dropped_rows := NULL;
        EXECUTE format('DROP TABLE %I', part.relname);
        RETURN NEXT;
    END LOOP;
    DELETE FROM samples_default WHERE ts < now() - retention;
    GET DIAGNOSTICS dropped_rows = ROW_COUNT;
    IF dropped_rows > 0 THEN
        partition := 'samples_default';
        RETURN NEXT;
    END IF;
END
$$;
