-- The Go keypooler's schema, column for column. Every statement is IF NOT EXISTS, so a
-- database the Go service wrote is adopted as it is: nothing is dropped or rewritten.
CREATE TABLE IF NOT EXISTS tiers (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS tier_features (
    tier_id        TEXT NOT NULL,
    feature        TEXT NOT NULL,
    rate_limit     INTEGER NOT NULL,
    window_seconds INTEGER NOT NULL DEFAULT 60,
    PRIMARY KEY (tier_id, feature)
);

CREATE TABLE IF NOT EXISTS keys (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    key_value            TEXT NOT NULL,
    tier_id              TEXT NOT NULL,
    is_active            INTEGER DEFAULT 1,
    expires_at           TIMESTAMP,
    usage_limit          INTEGER,
    usage_count          INTEGER NOT NULL DEFAULT 0,
    usage_window_seconds INTEGER,
    usage_window_start   TIMESTAMP,
    metadata_json        TEXT NOT NULL DEFAULT '{}',
    created_at           TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS key_secrets (
    key_id TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (key_id, name)
);

CREATE TABLE IF NOT EXISTS consumers (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE NOT NULL,
    token_hash  TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    is_active   INTEGER DEFAULT 1,
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS consumer_scopes (
    consumer_id TEXT NOT NULL,
    tier_id     TEXT NOT NULL,
    PRIMARY KEY (consumer_id, tier_id)
);

CREATE TABLE IF NOT EXISTS usage_events (
    id          TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    consumer_id TEXT NOT NULL,
    feature     TEXT NOT NULL,
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
