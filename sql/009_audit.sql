-- Loss you can see (revline/audit, docs/audit.md): per-vehicle sequence accounting, what the
-- devices report on status/<vin>, the broker's drop counters, and every gap's fate.
--
-- Kept up to date by the consumer: audit_vehicles and audit_ranges inside each write's own
-- transaction (revline.audit.accounting, per committed write, never per sample in SQL); the
-- rest by its audit task (revline.audit.service) after commits.

-- One row per vehicle, upserted by every write that holds it (after a per-vehicle advisory lock
-- that makes two writes of the same vehicle merge their ranges one after the other).
CREATE TABLE audit_vehicles (
    vin text PRIMARY KEY,
    samples bigint NOT NULL DEFAULT 0,
    -- distinct sequence numbers stored (each counted once, the first time it committed)
    duplicates bigint NOT NULL DEFAULT 0,
    -- samples received again after they were stored (redelivery, resends), absorbed
    seq_min bigint,
    seq_max bigint,
    last_seen timestamptz,
    -- the newest sample's time
    last_write timestamptz,
    -- when a write last held the vehicle (the transaction's time)
    verified_at timestamptz
    -- when the audit task last checked the ranges against the cold table
);

-- The stored sequence numbers of each vehicle as contiguous runs [lo, hi], never overlapping
-- or touching (merged); the holes between them are the gaps. ts_min/ts_max bound the samples'
-- times, so that a check against the cold table reads only that slice of it.
CREATE TABLE audit_ranges (
    vin text NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    ts_min bigint NOT NULL,
    ts_max bigint NOT NULL,
    -- µs since the epoch, as in the contract
    PRIMARY KEY (vin, lo),
    CHECK (lo <= hi)
);

-- Every gap seen, and how it ended: 'open' (missing), 'repaired' (filled after it was requested
-- on cmd/<vin>), 'lost' (the device declared it lost: cause 'evicted' or 'not_held'). A gap
-- that fills before it is requested was a late (out-of-order) delivery and is forgotten.
CREATE TABLE audit_gaps (
    vin text NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'repaired', 'lost')),
    cause text,
    missing bigint NOT NULL,
    -- samples of [lo, hi] not stored: now while open, when it ended otherwise
    opened_at timestamptz NOT NULL DEFAULT now(),
    closed_at timestamptz,
    requests integer NOT NULL DEFAULT 0,
    requested_at timestamptz,
    PRIMARY KEY (vin, lo),
    CHECK (lo <= hi)
);

CREATE INDEX audit_gaps_open ON audit_gaps (vin) WHERE state = 'open';

-- Losses the devices declare on status/<vin>: 'evicted' (the spool hit its cap: a seq range
-- and how many samples it held), 'not_held' (asked to resend, the device no longer holds
-- them), 'crash' (samples taken but not yet in the spool when the device died; no seq: counted
-- on restart, an estimate).
CREATE TABLE audit_losses (
    vin text NOT NULL,
    cause text NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    samples bigint NOT NULL,
    at timestamptz,
    reported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vin, cause, lo)
);

-- The latest status each device published (status/<vin>), or its last will.
CREATE TABLE audit_status (
    vin text PRIMARY KEY,
    online boolean NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    backlog bigint,
    oldest_unsent timestamptz,
    next_seq bigint,
    durable_below bigint,
    clock text,
    version text,
    payload bytea NOT NULL
);

-- Mosquitto's $SYS counters as last read, per broker: `dropped` is the broker's own counter
-- (since its start), `dropped_total` what the audit counted across broker restarts.
CREATE TABLE audit_broker (
    broker text PRIMARY KEY,
    dropped bigint NOT NULL DEFAULT 0,
    dropped_total bigint NOT NULL DEFAULT 0,
    stored_messages bigint,
    clients bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_drop_at timestamptz
);
