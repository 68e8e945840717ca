-- Additive (issue 14 item 5): SQLite's fast group commit updates a rate window whose row it has
-- written before by the row's rowid, checking that row's key, feature and window length. A
-- rowid can stop naming that row (a VACUUM may renumber rowids; a key's rows are deleted with
-- the key): the commit then inserts into this view, because its update changed fewer rows than
-- it named, and the trigger aborts the commit. The store forgets the rowids it knew and commits
-- the batch again through the upsert, which finds each row by its UNIQUE columns.
CREATE VIEW IF NOT EXISTS window_rows_missed AS SELECT 0 AS named, 0 AS changed WHERE 0;

CREATE TRIGGER IF NOT EXISTS window_rows_missed_abort INSTEAD OF INSERT ON window_rows_missed
BEGIN
    SELECT RAISE(ABORT, 'keypooler_window_rows_missed');
END;
