-- Dashboard rollups as continuous aggregates; refresh and retention policies are in R_policies.
-- Columns are the same as the plain-mode tables, so dashboard queries work in both modes.
CREATE MATERIALIZED VIEW samples_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    vin,
    time_bucket(interval '1 minute', ts) AS bucket,
    count(*) AS sample_count,
    avg(speed) AS speed_avg, min(speed) AS speed_min, max(speed) AS speed_max,
    avg(rpm) AS rpm_avg, min(rpm) AS rpm_min, max(rpm) AS rpm_max,
    avg(coolant) AS coolant_avg, min(coolant) AS coolant_min, max(coolant) AS coolant_max,
    avg(intake) AS intake_avg, min(intake) AS intake_min, max(intake) AS intake_max,
    avg(throttle) AS throttle_avg, min(throttle) AS throttle_min, max(throttle) AS throttle_max,
    avg(load) AS load_avg, min(load) AS load_min, max(load) AS load_max,
    avg(maf) AS maf_avg, min(maf) AS maf_min, max(maf) AS maf_max,
    avg(fuel) AS fuel_avg, min(fuel) AS fuel_min, max(fuel) AS fuel_max,
    avg(battery) AS battery_avg, min(battery) AS battery_min, max(battery) AS battery_max,
    avg(lat) AS lat_avg, min(lat) AS lat_min, max(lat) AS lat_max,
    avg(lon) AS lon_avg, min(lon) AS lon_min, max(lon) AS lon_max,
    avg(alt) AS alt_avg, min(alt) AS alt_min, max(alt) AS alt_max,
    avg(heading) AS heading_avg, min(heading) AS heading_min, max(heading) AS heading_max,
    avg(gps_speed) AS gps_speed_avg, min(gps_speed) AS gps_speed_min, max(gps_speed) AS gps_speed_max
FROM samples
GROUP BY vin, time_bucket(interval '1 minute', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW samples_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT
    vin,
    time_bucket(interval '1 hour', ts) AS bucket,
    count(*) AS sample_count,
    avg(speed) AS speed_avg, min(speed) AS speed_min, max(speed) AS speed_max,
    avg(rpm) AS rpm_avg, min(rpm) AS rpm_min, max(rpm) AS rpm_max,
    avg(coolant) AS coolant_avg, min(coolant) AS coolant_min, max(coolant) AS coolant_max,
    avg(intake) AS intake_avg, min(intake) AS intake_min, max(intake) AS intake_max,
    avg(throttle) AS throttle_avg, min(throttle) AS throttle_min, max(throttle) AS throttle_max,
    avg(load) AS load_avg, min(load) AS load_min, max(load) AS load_max,
    avg(maf) AS maf_avg, min(maf) AS maf_min, max(maf) AS maf_max,
    avg(fuel) AS fuel_avg, min(fuel) AS fuel_min, max(fuel) AS fuel_max,
    avg(battery) AS battery_avg, min(battery) AS battery_min, max(battery) AS battery_max,
    avg(lat) AS lat_avg, min(lat) AS lat_min, max(lat) AS lat_max,
    avg(lon) AS lon_avg, min(lon) AS lon_min, max(lon) AS lon_max,
    avg(alt) AS alt_avg, min(alt) AS alt_min, max(alt) AS alt_max,
    avg(heading) AS heading_avg, min(heading) AS heading_min, max(heading) AS heading_max,
    avg(gps_speed) AS gps_speed_avg, min(gps_speed) AS gps_speed_min, max(gps_speed) AS gps_speed_max
FROM samples
GROUP BY vin, time_bucket(interval '1 hour', ts)
WITH NO DATA;
