-- Additive (SPEC §8.3): filtered audit reads and a daily rollup kept forever.
-- Filters by key or consumer page newest first: an index on the column alone already ends in
-- the rowid, so `key_id = ? AND rowid < ? ORDER BY rowid DESC` walks it directly. The Go
-- schema had the key index under this very name, so a Go database keeps its own. Only two:
-- each index costs the group commit one more insert per serve.
CREATE INDEX IF NOT EXISTS idx_usage_events_key_id ON usage_events (key_id);
CREATE INDEX IF NOT EXISTS idx_usage_events_consumer_id ON usage_events (consumer_id);
-- Serves per UTC day (YYYY-MM-DD) and (key, consumer, feature), with reported outcome
-- classes; `served` minus the class counts = serves without a report.
CREATE TABLE IF NOT EXISTS usage_rollup (
    day             TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    consumer_id     TEXT NOT NULL,
    feature         TEXT NOT NULL,
    served          INTEGER NOT NULL,
    ok              INTEGER NOT NULL DEFAULT 0,
    client_error    INTEGER NOT NULL DEFAULT 0,
    auth_invalid    INTEGER NOT NULL DEFAULT 0,
    quota_exhausted INTEGER NOT NULL DEFAULT 0,
    rate_limited    INTEGER NOT NULL DEFAULT 0,
    upstream_error  INTEGER NOT NULL DEFAULT 0,
    network         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, consumer_id, feature)
);
-- One row: every day up to and including `through_day` is in usage_rollup (and only those
-- days' raw rows may be pruned).
CREATE TABLE IF NOT EXISTS usage_rollup_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    through_day TEXT NOT NULL
);
