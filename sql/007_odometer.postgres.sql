-- The odometer (revline/fields.py: km, 0.1 km, 0 to 2,000,000): cold, hot, decoded, rollups.
-- Each statement can run again (IF NOT EXISTS, OR REPLACE). A nullable column without a default
-- is added without rewriting a row, on every partition of samples too.
ALTER TABLE samples ADD COLUMN IF NOT EXISTS odometer_e1 integer;

ALTER TABLE vehicle_state
    ADD COLUMN IF NOT EXISTS odometer double precision,
    ADD COLUMN IF NOT EXISTS odometer_ts timestamptz;

-- 006_decoded with the odometer: a view may only gain columns at its end.
CREATE OR REPLACE VIEW samples_decoded AS
SELECT
    vin,
    ts,
    seq,
    received_at,
    (speed_e1 / 1e1::float8)::real AS speed,
    (rpm_e2 / 1e2::float8)::real AS rpm,
    (coolant_e1 / 1e1::float8)::real AS coolant,
    (intake_e1 / 1e1::float8)::real AS intake,
    (throttle_e2 / 1e2::float8)::real AS throttle,
    (load_e2 / 1e2::float8)::real AS load,
    (maf_e2 / 1e2::float8)::real AS maf,
    (fuel_e2 / 1e2::float8)::real AS fuel,
    (battery_e3 / 1e3::float8)::real AS battery,
    (lat_e7 / 1e7::float8)::double precision AS lat,
    (lon_e7 / 1e7::float8)::double precision AS lon,
    (alt_e1 / 1e1::float8)::real AS alt,
    (heading_e1 / 1e1::float8)::real AS heading,
    (gps_speed_e1 / 1e1::float8)::real AS gps_speed,
    flags,
    extra,
    (odometer_e1 / 1e1::float8)::double precision AS odometer
FROM samples;

ALTER TABLE samples_1m
    ADD COLUMN IF NOT EXISTS odometer_avg double precision,
    ADD COLUMN IF NOT EXISTS odometer_min double precision,
    ADD COLUMN IF NOT EXISTS odometer_max double precision;

ALTER TABLE samples_1h
    ADD COLUMN IF NOT EXISTS odometer_avg double precision,
    ADD COLUMN IF NOT EXISTS odometer_min double precision,
    ADD COLUMN IF NOT EXISTS odometer_max double precision;

-- The refresh of 005_rollups with the odometer's aggregates. Buckets rolled up before keep their
-- rows (odometer NULL, as it was never sent) until a late sample makes the refresh recompute them.
CREATE OR REPLACE FUNCTION revline_refresh_rollup(rollup text, width interval, overlap interval)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    since timestamptz;
    upto timestamptz := clock_timestamp();
    buckets bigint;
BEGIN
    SELECT watermark INTO since FROM revline_rollup_state s WHERE s.rollup = revline_refresh_rollup.rollup
    FOR UPDATE;
    EXECUTE format($q$
        WITH touched AS (
            SELECT DISTINCT vin, date_bin($1, ts, timestamptz 'epoch') AS bucket
            FROM samples WHERE received_at > $2 - $3
        )
        INSERT INTO %I
        SELECT s.vin, t.bucket,
            count(*) AS sample_count,
            avg(speed_e1::float8) / 1e1::float8 AS speed_avg,
            (min(speed_e1) / 1e1::float8)::real AS speed_min,
            (max(speed_e1) / 1e1::float8)::real AS speed_max,
            avg(rpm_e2::float8) / 1e2::float8 AS rpm_avg,
            (min(rpm_e2) / 1e2::float8)::real AS rpm_min,
            (max(rpm_e2) / 1e2::float8)::real AS rpm_max,
            avg(coolant_e1::float8) / 1e1::float8 AS coolant_avg,
            (min(coolant_e1) / 1e1::float8)::real AS coolant_min,
            (max(coolant_e1) / 1e1::float8)::real AS coolant_max,
            avg(intake_e1::float8) / 1e1::float8 AS intake_avg,
            (min(intake_e1) / 1e1::float8)::real AS intake_min,
            (max(intake_e1) / 1e1::float8)::real AS intake_max,
            avg(throttle_e2::float8) / 1e2::float8 AS throttle_avg,
            (min(throttle_e2) / 1e2::float8)::real AS throttle_min,
            (max(throttle_e2) / 1e2::float8)::real AS throttle_max,
            avg(load_e2::float8) / 1e2::float8 AS load_avg,
            (min(load_e2) / 1e2::float8)::real AS load_min,
            (max(load_e2) / 1e2::float8)::real AS load_max,
            avg(maf_e2::float8) / 1e2::float8 AS maf_avg,
            (min(maf_e2) / 1e2::float8)::real AS maf_min,
            (max(maf_e2) / 1e2::float8)::real AS maf_max,
            avg(fuel_e2::float8) / 1e2::float8 AS fuel_avg,
            (min(fuel_e2) / 1e2::float8)::real AS fuel_min,
            (max(fuel_e2) / 1e2::float8)::real AS fuel_max,
            avg(battery_e3::float8) / 1e3::float8 AS battery_avg,
            (min(battery_e3) / 1e3::float8)::real AS battery_min,
            (max(battery_e3) / 1e3::float8)::real AS battery_max,
            avg(lat_e7::float8) / 1e7::float8 AS lat_avg,
            (min(lat_e7) / 1e7::float8)::double precision AS lat_min,
            (max(lat_e7) / 1e7::float8)::double precision AS lat_max,
            avg(lon_e7::float8) / 1e7::float8 AS lon_avg,
            (min(lon_e7) / 1e7::float8)::double precision AS lon_min,
            (max(lon_e7) / 1e7::float8)::double precision AS lon_max,
            avg(alt_e1::float8) / 1e1::float8 AS alt_avg,
            (min(alt_e1) / 1e1::float8)::real AS alt_min,
            (max(alt_e1) / 1e1::float8)::real AS alt_max,
            avg(heading_e1::float8) / 1e1::float8 AS heading_avg,
            (min(heading_e1) / 1e1::float8)::real AS heading_min,
            (max(heading_e1) / 1e1::float8)::real AS heading_max,
            avg(gps_speed_e1::float8) / 1e1::float8 AS gps_speed_avg,
            (min(gps_speed_e1) / 1e1::float8)::real AS gps_speed_min,
            (max(gps_speed_e1) / 1e1::float8)::real AS gps_speed_max,
            avg(odometer_e1::float8) / 1e1::float8 AS odometer_avg,
            (min(odometer_e1) / 1e1::float8)::double precision AS odometer_min,
            (max(odometer_e1) / 1e1::float8)::double precision AS odometer_max
        FROM touched t
        JOIN samples s ON s.vin = t.vin AND s.ts >= t.bucket AND s.ts < t.bucket + $1
        GROUP BY s.vin, t.bucket
        ON CONFLICT (vin, bucket) DO UPDATE SET
            sample_count = excluded.sample_count,
            speed_avg = excluded.speed_avg, speed_min = excluded.speed_min, speed_max = excluded.speed_max,
            rpm_avg = excluded.rpm_avg, rpm_min = excluded.rpm_min, rpm_max = excluded.rpm_max,
            coolant_avg = excluded.coolant_avg, coolant_min = excluded.coolant_min, coolant_max = excluded.coolant_max,
            intake_avg = excluded.intake_avg, intake_min = excluded.intake_min, intake_max = excluded.intake_max,
            throttle_avg = excluded.throttle_avg, throttle_min = excluded.throttle_min, throttle_max = excluded.throttle_max,
            load_avg = excluded.load_avg, load_min = excluded.load_min, load_max = excluded.load_max,
            maf_avg = excluded.maf_avg, maf_min = excluded.maf_min, maf_max = excluded.maf_max,
            fuel_avg = excluded.fuel_avg, fuel_min = excluded.fuel_min, fuel_max = excluded.fuel_max,
            battery_avg = excluded.battery_avg, battery_min = excluded.battery_min, battery_max = excluded.battery_max,
            lat_avg = excluded.lat_avg, lat_min = excluded.lat_min, lat_max = excluded.lat_max,
            lon_avg = excluded.lon_avg, lon_min = excluded.lon_min, lon_max = excluded.lon_max,
            alt_avg = excluded.alt_avg, alt_min = excluded.alt_min, alt_max = excluded.alt_max,
            heading_avg = excluded.heading_avg, heading_min = excluded.heading_min, heading_max = excluded.heading_max,
            gps_speed_avg = excluded.gps_speed_avg, gps_speed_min = excluded.gps_speed_min, gps_speed_max = excluded.gps_speed_max,
            odometer_avg = excluded.odometer_avg, odometer_min = excluded.odometer_min, odometer_max = excluded.odometer_max
    $q$, rollup) USING width, since, overlap;
    GET DIAGNOSTICS buckets = ROW_COUNT;
    UPDATE revline_rollup_state s SET watermark = upto WHERE s.rollup = revline_refresh_rollup.rollup;
    RETURN buckets;
END
$$;
