-- Additive (SPEC §8.2, issue 9): what a key's next transitions depend on, so a restart forgets
-- none of it — each escalation ladder's step and when its decay counts from, and the first
-- auth_invalid (serve and time) a second may follow — and a throttled tier's cooldown.
ALTER TABLE key_health ADD COLUMN rate_step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_health ADD COLUMN rate_rested_from TIMESTAMP;
ALTER TABLE key_health ADD COLUMN breaker_step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_health ADD COLUMN breaker_rested_from TIMESTAMP;
ALTER TABLE key_health ADD COLUMN auth_serve_id TEXT;
ALTER TABLE key_health ADD COLUMN auth_at TIMESTAMP;
-- One row per tier that was ever throttled as a whole; a passed `cooled_until` means serving.
CREATE TABLE IF NOT EXISTS tier_health (
    tier_id      TEXT PRIMARY KEY,
    cooled_until TIMESTAMP NOT NULL
);
