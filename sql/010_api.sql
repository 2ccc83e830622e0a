-- API keys of `revline api` (revline/api/keys.py). A key is shown once, when it is made, as
-- `rvl_<id>_<secret>`; only the SHA-256 of the whole key is stored, and the id finds the row, so
-- checking a key is one primary-key lookup and one constant-time comparison.
-- Scopes: `read:*` (every vehicle), `read:<VIN>` (that vehicle), `ingest:<VIN>` (post its
-- batches). rate_per_s / burst: this key's token bucket, NULL for the server's defaults.
CREATE TABLE api_keys (
    id text PRIMARY KEY CHECK (id ~ '^[a-z0-9]{12}$'),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    key_hash bytea NOT NULL CHECK (length(key_hash) = 32),
    scopes text[] NOT NULL CHECK (cardinality(scopes) >= 1),
    rate_per_s real CHECK (rate_per_s > 0),
    burst integer CHECK (burst >= 1),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
