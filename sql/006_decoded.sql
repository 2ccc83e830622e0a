-- The cold table in real units (km/h, rpm, degC, %, g/s, V, degrees, m), for people and
-- ad-hoc dashboard queries; the same in both modes.
CREATE VIEW samples_decoded AS
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
    extra
FROM samples;
