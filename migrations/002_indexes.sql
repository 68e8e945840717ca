-- Additive: lookups the service makes (children by parent, newest audit rows first).
CREATE INDEX IF NOT EXISTS idx_keys_tier_id ON keys (tier_id);
CREATE INDEX IF NOT EXISTS idx_consumers_token_hash ON consumers (token_hash);
CREATE INDEX IF NOT EXISTS idx_usage_events_created_at ON usage_events (created_at);
