-- Additive (SPEC §8.4, issue 11): limits shaped like real plans.
-- A serve's cost in budget units; NULL (every Go-era row) means 1.
ALTER TABLE usage_events ADD COLUMN cost INTEGER;

-- A feature's windows after its first: the first stays the Go `tier_features` row, so a Go
-- service or a Go-era client sees exactly what it saw. `position` orders them (1, 2, …).
CREATE TABLE IF NOT EXISTS feature_windows (
    tier_id        TEXT NOT NULL,
    feature        TEXT NOT NULL,
    position       INTEGER NOT NULL,
    rate_limit     INTEGER NOT NULL,
    window_seconds INTEGER NOT NULL,
    PRIMARY KEY (tier_id, feature, position)
) WITHOUT ROWID;

-- Each (key, feature, window) rate window of a minute or longer, as the group commit last
-- wrote it with the serves it counts: restored at startup so no restart reopens a window.
CREATE TABLE IF NOT EXISTS rate_windows (
    key_id         TEXT NOT NULL,
    feature        TEXT NOT NULL,
    window_seconds INTEGER NOT NULL,
    window_start   TIMESTAMP NOT NULL,
    count          INTEGER NOT NULL,
    PRIMARY KEY (key_id, feature, window_seconds)
) WITHOUT ROWID;
