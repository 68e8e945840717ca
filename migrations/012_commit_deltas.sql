-- Additive (SPEC §8.7, issue 14): the database decides budgets and rate windows, so several
-- replicas on one database count as one. A group commit no longer writes absolute counters; it
-- inserts per-key and per-window deltas into these two views, whose INSTEAD OF triggers apply
-- each row in order — refusing it with RAISE(ABORT, 'keypooler_refused: …') when it would
-- take a key past its budget or a window past its limit. The error aborts the statement and
-- the group commit rolls its whole transaction back; the writer recognises the message as a
-- conflict, reads the counters back and re-decides (src/ledger.rs). The views never hold rows.
--
-- A window has ended when its start lies `seconds` or more before the serve (2 ms tolerance:
-- julianday keeps milliseconds, so the database never refuses a reset the process's own
-- microsecond clock made). A windowed count with no readable start is a fresh window, as in
-- memory (src/pool/gates.rs `current_usage`).

-- One row per key and budget window touched by a batch: `units` served from `at` (the earliest
-- serve of the segment, wall time); `usage_limit` is the process's limit for a RegBot key
-- (stored keys are checked against keys.usage_limit as the database holds it).
CREATE VIEW IF NOT EXISTS usage_deltas AS
    SELECT NULL AS key_id, NULL AS units, NULL AS at, NULL AS usage_limit WHERE 0;

CREATE TRIGGER IF NOT EXISTS usage_deltas_apply INSTEAD OF INSERT ON usage_deltas
BEGIN
    SELECT RAISE(ABORT, 'keypooler_refused: budget') FROM keys AS k
    WHERE k.id = NEW.key_id AND k.usage_limit IS NOT NULL
      AND (CASE WHEN k.usage_window_seconds > 0 AND (julianday(k.usage_window_start) IS NULL
            OR (julianday(NEW.at) - julianday(k.usage_window_start)) * 86400.0
               >= k.usage_window_seconds - 0.002)
           THEN 0 ELSE k.usage_count END) + NEW.units > k.usage_limit;
    UPDATE keys SET
        usage_count = (CASE WHEN usage_window_seconds > 0 AND (julianday(usage_window_start) IS NULL
            OR (julianday(NEW.at) - julianday(usage_window_start)) * 86400.0
               >= usage_window_seconds - 0.002)
           THEN 0 ELSE usage_count END) + NEW.units,
        usage_window_start = CASE WHEN usage_window_seconds > 0
            AND (julianday(usage_window_start) IS NULL
            OR (julianday(NEW.at) - julianday(usage_window_start)) * 86400.0
               >= usage_window_seconds - 0.002)
           THEN NEW.at ELSE usage_window_start END
    WHERE id = NEW.key_id;
    SELECT RAISE(ABORT, 'keypooler_refused: budget')
    WHERE NEW.key_id LIKE 'regbot:%' AND NEW.usage_limit IS NOT NULL
      AND coalesce((SELECT usage_count FROM regbot_keys WHERE key_id = NEW.key_id), 0)
          + NEW.units > NEW.usage_limit;
    INSERT OR IGNORE INTO regbot_keys (key_id, usage_count)
        SELECT NEW.key_id, 0 WHERE NEW.key_id LIKE 'regbot:%';
    UPDATE regbot_keys SET usage_count = usage_count + NEW.units
    WHERE key_id = NEW.key_id AND NEW.key_id LIKE 'regbot:%';
END;

-- One row per (key, feature, window length) and rate window touched by a batch: `units` serves
-- from `at`, against `rate_limit` (the process's limit for that window). Every window length
-- is kept, so replicas agree on each window's start and count.
CREATE VIEW IF NOT EXISTS window_deltas AS
    SELECT NULL AS key_id, NULL AS feature, NULL AS window_seconds, NULL AS at,
        NULL AS units, NULL AS rate_limit WHERE 0;

CREATE TRIGGER IF NOT EXISTS window_deltas_apply INSTEAD OF INSERT ON window_deltas
BEGIN
    INSERT OR IGNORE INTO rate_windows (key_id, feature, window_seconds, window_start, count)
        VALUES (NEW.key_id, NEW.feature, NEW.window_seconds, NEW.at, 0);
    SELECT RAISE(ABORT, 'keypooler_refused: rate window') FROM rate_windows AS w
    WHERE w.key_id = NEW.key_id AND w.feature = NEW.feature
      AND w.window_seconds = NEW.window_seconds
      AND (CASE WHEN julianday(w.window_start) IS NULL
            OR (julianday(NEW.at) - julianday(w.window_start)) * 86400.0
               >= w.window_seconds - 0.002
           THEN 0 ELSE w.count END) + NEW.units > NEW.rate_limit;
    UPDATE rate_windows SET
        count = (CASE WHEN julianday(window_start) IS NULL
            OR (julianday(NEW.at) - julianday(window_start)) * 86400.0 >= window_seconds - 0.002
           THEN 0 ELSE count END) + NEW.units,
        window_start = CASE WHEN julianday(window_start) IS NULL
            OR (julianday(NEW.at) - julianday(window_start)) * 86400.0 >= window_seconds - 0.002
           THEN NEW.at ELSE window_start END
    WHERE key_id = NEW.key_id AND feature = NEW.feature AND window_seconds = NEW.window_seconds;
END;

-- The fast path of the same rules, set-based, for a batch where each key (window) has one row:
-- a guard statement inserts a row here when any delta does not fit, which the named CHECK
-- refuses (`CHECK constraint failed: keypooler_refused`), aborting the commit; otherwise
-- nothing is written here and one UPDATE (upsert) applies every row. Never holds a row.
CREATE TABLE IF NOT EXISTS commit_guard (
    refused TEXT CONSTRAINT keypooler_refused CHECK (refused IS NULL)
);
