-- Additive (SPEC §8.3): filtered audit reads and a daily rollup kept forever.
-- Filters by key or consumer page newest first through these side indexes, filled in bulk
-- behind the hot path (src/audit.rs) up to `usage_index_state.indexed_through` (a rowid); rows
-- above it are found by scanning the short tail. Not indexes on usage_events: each would cost
-- the group commit one more B-tree page written per distinct key per commit (measured: /key
-- fell from about 28,000 to 12,000 req/s with a key_id and a consumer_id index).
-- `row` is the audit row's rowid; (id, row) is the whole entry and its key, so one B-tree per
-- side index (WITHOUT ROWID) holds it — a rowid table plus an index wrote every entry twice
-- (measured: durable /key 0.37x /health against 0.40x without side indexes). The key ends in
-- `row`, which is the walk newest first; pruning deletes an entry by (id, row).
CREATE TABLE IF NOT EXISTS usage_by_key (
    key_id TEXT NOT NULL,
    row    INTEGER NOT NULL,
    PRIMARY KEY (key_id, row)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_by_consumer (
    consumer_id TEXT NOT NULL,
    row         INTEGER NOT NULL,
    PRIMARY KEY (consumer_id, row)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_index_state (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_through INTEGER NOT NULL
);
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
