-- Insight (revline/insight/, docs/insight.md): trips, odometer history, trouble codes, health and
-- driving events, derived on the server from what each write committed. Plain tables in both
-- modes: they are small (a row per trip or event, not per sample).
--
-- How they stay right: a write records only what it touched (insight_dirty: one row per vehicle,
-- its time span) and the raw trouble-code reports; after commit a background task recomputes the
-- trips, events and odometer history of the dirty span (widened to the trips around it) from the
-- cold table and replaces them in one transaction. A backlog uploaded late, shuffled or in halves
-- gives the same rows as the same samples uploaded live.

-- What committed writes touched and the background task has not folded in yet.
CREATE TABLE insight_dirty (
    vin text PRIMARY KEY,
    ts_min timestamptz NOT NULL,
    ts_max timestamptz NOT NULL,
    generation bigint NOT NULL DEFAULT 1,
    dirty_since timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE insight_dirty IS
    'Spans of committed samples not yet folded into trips/events (one row per vehicle, merged).';
COMMENT ON COLUMN insight_dirty.ts_min IS 'Earliest sample time written since the last recompute.';
COMMENT ON COLUMN insight_dirty.ts_max IS 'Latest sample time written since the last recompute.';
COMMENT ON COLUMN insight_dirty.generation IS
    'Bumped by every write; the recompute deletes the row only if it is unchanged.';
COMMENT ON COLUMN insight_dirty.dirty_since IS 'When the oldest unfolded write committed.';

-- Trips: a vehicle moving, with stops shorter than the idle timeout plus the resume window.
CREATE TABLE trips (
    vin text NOT NULL,
    start_ts timestamptz NOT NULL,
    end_ts timestamptz NOT NULL,
    start_lat double precision,
    start_lon double precision,
    end_lat double precision,
    end_lon double precision,
    duration_s double precision NOT NULL,
    moving_s double precision NOT NULL,
    distance_km double precision NOT NULL,
    distance_source text NOT NULL CHECK (distance_source IN ('gps', 'speed', 'none')),
    avg_speed double precision,
    max_speed real,
    max_rpm real,
    max_coolant real,
    min_battery real,
    fuel_used_pct real,
    fuel_used_l real,
    odometer_start double precision,
    odometer_end double precision,
    samples integer NOT NULL,
    gap_s double precision NOT NULL,
    completeness real NOT NULL,
    hard_brakes integer NOT NULL DEFAULT 0,
    hard_accels integer NOT NULL DEFAULT 0,
    closed boolean NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vin, start_ts),
    CHECK (end_ts >= start_ts)
);
CREATE INDEX trips_vin_end ON trips (vin, end_ts);
COMMENT ON TABLE trips IS
    'One row per trip, recomputed over the affected span when late data arrives. Identity: (vin, start_ts).';
COMMENT ON COLUMN trips.start_ts IS 'Time of the first moving sample (speed at or above the moving threshold).';
COMMENT ON COLUMN trips.end_ts IS 'Time of the last moving sample.';
COMMENT ON COLUMN trips.start_lat IS 'First GPS position in the trip (degrees WGS84), NULL without GPS.';
COMMENT ON COLUMN trips.end_lat IS 'Last GPS position in the trip (degrees WGS84), NULL without GPS.';
COMMENT ON COLUMN trips.duration_s IS 'end_ts - start_ts, seconds.';
COMMENT ON COLUMN trips.moving_s IS 'Seconds spent at or above the moving threshold.';
COMMENT ON COLUMN trips.distance_km IS 'Distance: GPS track where present, else integrated OBD speed (distance_source).';
COMMENT ON COLUMN trips.distance_source IS 'gps, speed (integrated), or none.';
COMMENT ON COLUMN trips.avg_speed IS 'distance_km / duration, km/h.';
COMMENT ON COLUMN trips.max_speed IS 'Highest OBD speed (else GPS speed), km/h.';
COMMENT ON COLUMN trips.max_rpm IS 'Highest engine speed, 1/min.';
COMMENT ON COLUMN trips.max_coolant IS 'Highest coolant temperature, degC.';
COMMENT ON COLUMN trips.min_battery IS 'Lowest control module voltage, V.';
COMMENT ON COLUMN trips.fuel_used_pct IS 'Fuel level at start minus at end, % of tank (NULL without the PID).';
COMMENT ON COLUMN trips.fuel_used_l IS 'Fuel estimated from mass air flow (petrol, stoichiometric), litres.';
COMMENT ON COLUMN trips.odometer_start IS 'Odometer at the start (odometer_history), km.';
COMMENT ON COLUMN trips.odometer_end IS 'Odometer at the end (odometer_history), km.';
COMMENT ON COLUMN trips.samples IS 'Samples between start_ts and end_ts.';
COMMENT ON COLUMN trips.gap_s IS 'Seconds of the trip with no samples (gaps longer than the gap threshold).';
COMMENT ON COLUMN trips.completeness IS '1 - gap_s / duration_s: 1 is a trip with no gaps.';
COMMENT ON COLUMN trips.hard_brakes IS 'Hard braking events during the trip (vehicle_events).';
COMMENT ON COLUMN trips.hard_accels IS 'Hard acceleration events during the trip (vehicle_events).';
COMMENT ON COLUMN trips.closed IS 'False while newer data could still extend the trip (the vehicle may be driving).';
COMMENT ON COLUMN trips.computed_at IS 'When this row was (re)computed.';

-- Odometer: one point per trip end, never going backwards; anomalies flagged, not applied.
CREATE TABLE odometer_history (
    vin text NOT NULL,
    ts timestamptz NOT NULL,
    odometer_km double precision NOT NULL,
    reading_km double precision,
    source text NOT NULL CHECK (source IN ('obd', 'distance')),
    anomaly text CHECK (anomaly IN ('jump', 'rollback')),
    anomaly_km double precision,
    PRIMARY KEY (vin, ts)
);
COMMENT ON TABLE odometer_history IS
    'Odometer per vehicle at each trip end: monotonic (never goes backwards), anomalies flagged.';
COMMENT ON COLUMN odometer_history.ts IS 'The trip end this point belongs to.';
COMMENT ON COLUMN odometer_history.odometer_km IS 'Monotonic odometer, km: the OBD reading when plausible, else the last value plus the trip distance.';
COMMENT ON COLUMN odometer_history.reading_km IS 'The OBD odometer (PID 01A6) as read at the trip end, NULL if the car has none.';
COMMENT ON COLUMN odometer_history.source IS 'obd (the reading was taken) or distance (accumulated trip distance).';
COMMENT ON COLUMN odometer_history.anomaly IS 'jump (reading far ahead of the distance driven) or rollback (reading below the last value); NULL when plausible.';
COMMENT ON COLUMN odometer_history.anomaly_km IS 'reading_km minus the expected odometer, km (signed).';

-- Trouble codes as the device reported them: the full set when it changed (empty = cleared).
CREATE TABLE dtc_reports (
    vin text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    codes text[] NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vin, ts, seq)
);
COMMENT ON TABLE dtc_reports IS 'Raw trouble-code sets sent by the edge (Sample.dtc), one row per report.';
COMMENT ON COLUMN dtc_reports.codes IS 'Every stored and pending code at that instant, sorted; empty when none.';

-- One row per code per time it was active: first seen, and cleared (NULL while active).
CREATE TABLE dtc_events (
    vin text NOT NULL,
    code text NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    cleared timestamptz,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vin, code, first_seen)
);
CREATE INDEX dtc_events_active ON dtc_events (vin) WHERE cleared IS NULL;
COMMENT ON TABLE dtc_events IS 'Trouble codes per vehicle: when each appeared and when it was cleared.';
COMMENT ON COLUMN dtc_events.code IS 'SAE J2012 code, e.g. P0301.';
COMMENT ON COLUMN dtc_events.first_seen IS 'Time of the first report holding the code.';
COMMENT ON COLUMN dtc_events.last_seen IS 'Time of the last report holding the code.';
COMMENT ON COLUMN dtc_events.cleared IS 'Time of the first later report without it; NULL while active.';
COMMENT ON COLUMN dtc_events.detected_at IS 'When the server first stored this event (for new-code alerts).';

CREATE VIEW dtc_active AS
SELECT vin, code, first_seen, last_seen, detected_at FROM dtc_events WHERE cleared IS NULL;
COMMENT ON VIEW dtc_active IS 'The active trouble codes of each vehicle.';

-- Health and behaviour episodes: hard braking/acceleration, coolant over temperature, low battery.
CREATE TABLE vehicle_events (
    vin text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('hard_brake', 'hard_accel', 'coolant_hot', 'battery_low')),
    start_ts timestamptz NOT NULL,
    end_ts timestamptz NOT NULL,
    peak real NOT NULL,
    threshold real NOT NULL,
    lat double precision,
    lon double precision,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vin, kind, start_ts),
    CHECK (end_ts >= start_ts)
);
CREATE INDEX vehicle_events_vin_end ON vehicle_events (vin, end_ts);
COMMENT ON TABLE vehicle_events IS 'Health and driving episodes, recomputed with the trips.';
COMMENT ON COLUMN vehicle_events.kind IS 'hard_brake, hard_accel (m/s2), coolant_hot (degC), battery_low (V).';
COMMENT ON COLUMN vehicle_events.start_ts IS 'First sample beyond the threshold.';
COMMENT ON COLUMN vehicle_events.end_ts IS 'Last sample beyond the threshold.';
COMMENT ON COLUMN vehicle_events.peak IS 'Worst value: largest deceleration/acceleration (m/s2), highest coolant (degC), lowest voltage (V).';
COMMENT ON COLUMN vehicle_events.threshold IS 'The threshold in force when it was computed (revline/insight/thresholds.py).';
COMMENT ON COLUMN vehicle_events.lat IS 'GPS position at start_ts, if any.';
COMMENT ON COLUMN vehicle_events.detected_at IS 'When the server first stored this episode.';

-- The segmenter's view of each vehicle at the end of its data: is it driving right now?
CREATE TABLE vehicle_activity (
    vin text PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('idle', 'driving', 'paused')),
    state_since timestamptz NOT NULL,
    last_ts timestamptz NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE vehicle_activity IS 'Trip state of each vehicle as of its newest sample.';
COMMENT ON COLUMN vehicle_activity.state IS 'idle, driving, or paused (stopped within the idle timeout and resume window).';
COMMENT ON COLUMN vehicle_activity.state_since IS 'When that state began.';
COMMENT ON COLUMN vehicle_activity.last_ts IS 'Newest sample of the vehicle the state is computed from.';

-- Summaries.
CREATE VIEW weekly_summary AS
SELECT
    vin,
    date_trunc('week', start_ts AT TIME ZONE 'UTC') AS week,
    count(*) AS trips,
    sum(distance_km) AS distance_km,
    sum(duration_s) / 3600.0 AS driving_h,
    max(max_speed) AS max_speed,
    max(max_coolant) AS max_coolant,
    min(min_battery) AS min_battery,
    sum(fuel_used_l) AS fuel_used_l,
    sum(hard_brakes) AS hard_brakes,
    sum(hard_accels) AS hard_accels
FROM trips
GROUP BY vin, date_trunc('week', start_ts AT TIME ZONE 'UTC');
COMMENT ON VIEW weekly_summary IS 'Per vehicle and ISO week (UTC, Monday): trips, distance, hours, worst values, events.';

-- Where the fold of each vehicle stopped: the state of the trip machine and detectors after its
-- newest folded sample (revline/insight/stream.py). New samples all after it (a live car) are
-- folded on from here, without reading the open trip again; anything earlier is recomputed by
-- window, which writes a new one.
CREATE TABLE insight_checkpoints (
    vin text PRIMARY KEY,
    last_ts timestamptz NOT NULL,
    state jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE insight_checkpoints IS 'Resumable fold state per vehicle (internal to revline.insight).';
COMMENT ON COLUMN insight_checkpoints.last_ts IS 'Newest sample the state has seen; every older sample was folded into it.';
COMMENT ON COLUMN insight_checkpoints.state IS 'revline.insight.stream.Fold as JSON.';
