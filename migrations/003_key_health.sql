-- Additive (SPEC §8.2): each serve's reported outcome on its audit row, and each key's health.
-- NULL outcome columns = no report yet; the first report to set them wins.
ALTER TABLE usage_events ADD COLUMN outcome_class TEXT;
ALTER TABLE usage_events ADD COLUMN outcome_status INTEGER;
ALTER TABLE usage_events ADD COLUMN outcome_reported_at TIMESTAMP;
-- One row per key whose health ever changed; a key without a row is active. A table of its
-- own rather than columns on `keys`, so the Go schema's table keeps its shape and a health
-- change writes a small row of its own.
CREATE TABLE IF NOT EXISTS key_health (
    key_id      TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    reason      TEXT,
    until       TIMESTAMP,
    last_status INTEGER,
    strikes     INTEGER NOT NULL DEFAULT 0,
    changed_at  TIMESTAMP
);
