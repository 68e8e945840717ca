-- Additive (SPEC §8.3): a consumer's previous token during a rotation's grace. Both NULL when
-- no rotation is in its grace; the old token is accepted until `previous_token_expires_at`.
ALTER TABLE consumers ADD COLUMN previous_token_hash TEXT;
ALTER TABLE consumers ADD COLUMN previous_token_expires_at TIMESTAMP;
