-- Additive (SPEC §8.3, bulk import): a keyed hash of each key's value, so an import finds a
-- value already in its tier without decrypting any row. HMAC-SHA256 under a key derived from
-- ENCRYPTION_KEY (src/crypto.rs); NULL until startup fills it in from the values the pool
-- holds (Go-era rows included). A Go service reading this database ignores the column.
ALTER TABLE keys ADD COLUMN value_hash TEXT;
CREATE INDEX IF NOT EXISTS idx_keys_tier_value_hash ON keys (tier_id, value_hash);
