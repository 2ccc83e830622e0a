-- Dead letter: every message the consumer refused, with its raw bytes, so nothing is lost and
-- every refusal can be explained and replayed.
CREATE TABLE rejected (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic text NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL DEFAULT '',
    payload bytea NOT NULL
);

CREATE INDEX rejected_received_at ON rejected (received_at);
