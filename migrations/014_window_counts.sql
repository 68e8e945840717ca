-- Additive (SPEC §8.7, issue 14 item 5): rate-window counts move from `rate_windows` (WITHOUT
-- ROWID, clustered on the random key id) to this rowid table. Every group commit updates the
-- count of each key it served; the pool serves keys round robin, so one commit's keys are
-- neighbours in the rotation. Clustered on the key id they sat on as many B-tree pages as keys
-- (each page written whole to the WAL: 12.5 KiB of disk per serve with 10,000 keys); here rows
-- lie in first-serve order, which is rotation order, so one commit's updates share a page or
-- two. The UNIQUE index finds a row; an update changes neither indexed column, so it never
-- writes the index. `rate_windows` stays, no longer read or written (a build before this
-- migration still uses it: during a rolling upgrade its replicas count windows apart from
-- upgraded ones until they restart).
CREATE TABLE IF NOT EXISTS window_counts (
    key_id         TEXT NOT NULL,
    feature        TEXT NOT NULL,
    window_seconds INTEGER NOT NULL,
    window_start   TIMESTAMP NOT NULL,
    count          INTEGER NOT NULL,
    -- The limit the last commit checked this window against (its process's, from the delta);
    -- NULL for rows carried over below. The CHECK refuses a commit that takes `count` past
    -- it, as `commit_guard` does (`CHECK constraint failed: keypooler_refused`), with no guard
    -- statement of its own in the group commit.
    rate_limit     INTEGER,
    UNIQUE (key_id, feature, window_seconds),
    CONSTRAINT keypooler_refused CHECK (rate_limit IS NULL OR count <= rate_limit)
);

-- The windows as they stand, in the keys' creation order (which is also their rotation order).
INSERT OR IGNORE INTO window_counts (key_id, feature, window_seconds, window_start, count)
    SELECT w.key_id, w.feature, w.window_seconds, w.window_start, w.count
    FROM rate_windows AS w LEFT JOIN keys ON keys.id = w.key_id
    ORDER BY keys.rowid, w.key_id, w.feature, w.window_seconds;

-- Migration 012's trigger, the same rules on the new table.
DROP TRIGGER IF EXISTS window_deltas_apply;
CREATE TRIGGER window_deltas_apply INSTEAD OF INSERT ON window_deltas
BEGIN
    INSERT OR IGNORE INTO window_counts (key_id, feature, window_seconds, window_start, count,
        rate_limit) VALUES (NEW.key_id, NEW.feature, NEW.window_seconds, NEW.at, 0, NEW.rate_limit);
    SELECT RAISE(ABORT, 'keypooler_refused: rate window') FROM window_counts AS w
    WHERE w.key_id = NEW.key_id AND w.feature = NEW.feature
      AND w.window_seconds = NEW.window_seconds
      AND (CASE WHEN julianday(w.window_start) IS NULL
            OR (julianday(NEW.at) - julianday(w.window_start)) * 86400.0
               >= w.window_seconds - 0.002
           THEN 0 ELSE w.count END) + NEW.units > NEW.rate_limit;
    UPDATE window_counts SET
        count = (CASE WHEN julianday(window_start) IS NULL
            OR (julianday(NEW.at) - julianday(window_start)) * 86400.0 >= window_seconds - 0.002
           THEN 0 ELSE count END) + NEW.units,
        window_start = CASE WHEN julianday(window_start) IS NULL
            OR (julianday(NEW.at) - julianday(window_start)) * 86400.0 >= window_seconds - 0.002
           THEN NEW.at ELSE window_start END,
        rate_limit = NEW.rate_limit
    WHERE key_id = NEW.key_id AND feature = NEW.feature AND window_seconds = NEW.window_seconds;
END;

-- A key's budget, decided where its count is written: an update that takes `usage_count` past
-- `usage_limit` is refused (the group commit's fast path then needs no guard statement; a
-- reset to 0 always fits). Same message as migration 012's trigger.
CREATE TRIGGER IF NOT EXISTS keys_budget_refused BEFORE UPDATE OF usage_count ON keys
WHEN NEW.usage_limit IS NOT NULL AND NEW.usage_count > NEW.usage_limit
BEGIN
    SELECT RAISE(ABORT, 'keypooler_refused: budget');
END;
