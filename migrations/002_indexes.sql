-- Additive: lookups the service makes (children by parent, newest audit rows first).
CREATE INDEX IF NOT EXISTS idx_keys_tier_id ON keys (tier_id);
CREATE INDEX IF NOT EXISTS idx_consumers_token_hash ON consumers (token_hash);
-- By time, not by text: Go rows hold RFC 3339, CURRENT_TIMESTAMP and offset forms side by side.
CREATE INDEX IF NOT EXISTS idx_usage_events_created_jd ON usage_events (julianday(created_at));
