-- 011: read-only database roles for Grafana and the API, and the user-editable vehicle names.
--
-- Roles (cluster-wide in PostgreSQL, so created only when missing; grants are per database):
--   revline_reader   NOLOGIN: SELECT on every table and view of the schema, today's and future
--                    ones (default privileges of the role that runs the migrations);
--   revline_grafana  member of revline_reader, for Grafana's data source;
--   revline_api      member of revline_reader, for the HTTP API.
-- The login roles are created NOLOGIN without a password: `revline roles` (compose's one-shot
-- `roles` service) gives them LOGIN and their passwords from REVLINE_GRAFANA_DB_PASSWORD and
-- REVLINE_API_DB_PASSWORD (.env). A migration never holds a secret.
-- Creating roles needs CREATEROLE (the compose superuser has it; so does the admin user of the
-- usual managed services); without it this migration fails and says what to create by hand.

-- Names users give their vehicles: the dashboards show `name` (else the VIN) and `label` (a
-- plate, a group, a driver). Edit it with SQL as the database owner, e.g.
--   INSERT INTO vehicles (vin, name, label) VALUES ('1HGCM82633A004352', 'Blue Civic', 'B-RL 123')
--   ON CONFLICT (vin) DO UPDATE SET name = excluded.name, label = excluded.label;
-- A vehicle without a row is shown by its VIN. Nothing in the pipeline writes here.
CREATE TABLE vehicles (
    vin text PRIMARY KEY CHECK (vin ~ '^[A-HJ-NPR-Z0-9]{17}$'),
    name text NOT NULL DEFAULT '' CHECK (length(name) <= 100),
    label text NOT NULL DEFAULT '' CHECK (length(label) <= 100),
    notes text NOT NULL DEFAULT '' CHECK (length(notes) <= 2000),
    updated_at timestamptz NOT NULL DEFAULT now()
);

DO $roles$
DECLARE
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['revline_reader', 'revline_grafana', 'revline_api'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role);
            EXCEPTION
                -- Another database of this cluster migrating at the same moment made it.
                WHEN duplicate_object OR unique_violation THEN NULL;
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % cannot create role %: it needs CREATEROLE', current_user, role
                        USING HINT = 'create revline_reader, revline_grafana and revline_api '
                            'as an admin (docs/operations.md), then run revline migrate again',
                              ERRCODE = 'insufficient_privilege';
            END;
        END IF;
    END LOOP;
END
$roles$;

GRANT revline_reader TO revline_grafana, revline_api;
GRANT USAGE ON SCHEMA public TO revline_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO revline_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO revline_reader;
-- Belt and braces for the dashboards: no write even through a function, and a runaway panel
-- query is cancelled instead of holding the database.
ALTER ROLE revline_grafana SET default_transaction_read_only = on;
ALTER ROLE revline_grafana SET statement_timeout = '60s';
ALTER ROLE revline_api SET default_transaction_read_only = on;
