-- Additive (SPEC §8.5, issue 12): the RegBot credentials source. RegBot's own database is only
-- ever read; these tables are ours.
-- A tier's explicit RegBot service (`"source": {"regbot_service": …}`); a tier without a row
-- falls back to the seed's default mapping by its name.
CREATE TABLE IF NOT EXISTS tier_sources (
    tier_id        TEXT PRIMARY KEY,
    regbot_service TEXT NOT NULL
);
-- What we keep about RegBot credential N (key id `regbot:N`) — never its value. `usage_count`:
-- units served here, ever (the group commit writes it, absolute, like keys.usage_count);
-- `quota_used_seen`: RegBot's quota_used when we last saw it change, and `usage_at_seen` our
-- usage_count at that moment, so the budget is quota_total - quota_used_seen + usage_at_seen;
-- `fingerprint`: a keyed hash of the row's api_key and updated_at (a change re-probes a
-- quarantined key).
CREATE TABLE IF NOT EXISTS regbot_keys (
    key_id          TEXT PRIMARY KEY,
    usage_count     INTEGER NOT NULL DEFAULT 0,
    quota_used_seen INTEGER,
    usage_at_seen   INTEGER NOT NULL DEFAULT 0,
    fingerprint     TEXT
);
