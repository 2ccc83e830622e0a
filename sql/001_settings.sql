-- Settings the migrations and the maintenance task read at run time. `revline migrate` writes
-- them (R_policies) from its flags/env, so changing an interval is a re-run of migrate, not an edit.
CREATE TABLE revline_settings (
    key text PRIMARY KEY,
    value text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
