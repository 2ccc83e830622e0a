-- The odometer (revline/fields.py: km, 0.1 km, 0 to 2,000,000): cold, hot, decoded, rollups.
-- Each statement can run again (IF NOT EXISTS, OR REPLACE, a rollup rebuilt from itself). A
-- nullable column without a default is added without rewriting a row, compressed chunks included.
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

-- A continuous aggregate cannot gain a column, and dropping it would lose the rollups older than
-- the raw retention (its rows are their only copy). So the new one is built beside it, then this
-- hands over everything the old one holds: its rows (columns matched by name, a new one NULL),
-- its refresh and retention policies as they are in force, the privileges granted on it. Then it
-- drops the old one and gives the new one its name. Returns the rows copied.
CREATE OR REPLACE FUNCTION revline_replace_rollup(old_view text, new_view text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    target text;
    shared text;
    copied bigint;
    job record;
    moved integer;
    acl record;
BEGIN
    SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name)
    INTO STRICT target
    FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = new_view;
    SELECT string_agg(quote_ident(n.attname), ', ' ORDER BY n.attnum) INTO STRICT shared
    FROM pg_attribute n
    JOIN pg_attribute o ON o.attrelid = old_view::regclass AND o.attname = n.attname
        AND o.attnum > 0 AND NOT o.attisdropped
    WHERE n.attrelid = new_view::regclass AND n.attnum > 0 AND NOT n.attisdropped;
    -- Straight into the materialization hypertable, as TimescaleDB's own cagg_migrate does.
    EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM %I', target, shared, shared, old_view);
    GET DIAGNOSTICS copied = ROW_COUNT;
    FOR job IN
        SELECT proc_name, schedule_interval, scheduled, config FROM timescaledb_information.jobs
        WHERE hypertable_schema = current_schema() AND hypertable_name = old_view
    LOOP
        IF job.proc_name = 'policy_refresh_continuous_aggregate' THEN
            moved := add_continuous_aggregate_policy(new_view::regclass,
                start_offset => (job.config ->> 'start_offset')::interval,
                end_offset => (job.config ->> 'end_offset')::interval,
                schedule_interval => job.schedule_interval);
        ELSIF job.proc_name = 'policy_retention' THEN
            moved := add_retention_policy(new_view::regclass,
                drop_after => (job.config ->> 'drop_after')::interval,
                schedule_interval => job.schedule_interval);
        ELSE
            RAISE EXCEPTION 'revline_replace_rollup: % has a % job, which it cannot move',
                old_view, job.proc_name;
        END IF;
        PERFORM alter_job(moved, scheduled => job.scheduled);
    END LOOP;
    FOR acl IN
        SELECT a.privilege_type, a.grantee, a.is_grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = old_view::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON %I TO %s%s', acl.privilege_type, new_view,
            CASE WHEN acl.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(acl.grantee)) END,
            CASE WHEN acl.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    EXECUTE format('DROP MATERIALIZED VIEW %I', old_view);
    EXECUTE format('ALTER MATERIALIZED VIEW %I RENAME TO %I', new_view, old_view);
    RETURN copied;
END
$$;

DROP MATERIALIZED VIEW IF EXISTS samples_1m_next;
CREATE MATERIALIZED VIEW samples_1m_next
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    vin,
    time_bucket(interval '1 minute', ts) AS bucket,
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
FROM samples
GROUP BY vin, time_bucket(interval '1 minute', ts)
WITH NO DATA;

SELECT revline_replace_rollup('samples_1m', 'samples_1m_next');

DROP MATERIALIZED VIEW IF EXISTS samples_1h_next;
CREATE MATERIALIZED VIEW samples_1h_next
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    vin,
    time_bucket(interval '1 hour', ts) AS bucket,
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
FROM samples
GROUP BY vin, time_bucket(interval '1 hour', ts)
WITH NO DATA;

SELECT revline_replace_rollup('samples_1h', 'samples_1h_next');
