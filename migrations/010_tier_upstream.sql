-- Additive (SPEC §8.6, issue 13): a tier's upstream for proxy mode, as the validated JSON the
-- API accepted (base_url, auth, headers, timeout_seconds). One row per tier that has one; a tier
-- without a row has no upstream. Keyed by tier id, so a rename needs nothing; a forced tier
-- delete removes the row in its transaction.
CREATE TABLE IF NOT EXISTS tier_upstreams (
    tier_id TEXT PRIMARY KEY,
    upstream_json TEXT NOT NULL
);
