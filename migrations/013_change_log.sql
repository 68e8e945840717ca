-- Additive (SPEC §8.7, issue 14 item 3): a change log that replicas sharing this database poll
-- (src/sync.rs). Triggers fill it from every write to pool state — made by this service, another
-- replica, or any other writer — so no admin path has to remember to log. A row names what
-- changed (entity, id), never how: a replica reads that entity back and applies it. Counters
-- (keys.usage_count, usage_window_start, value_hash, rate_windows, regbot_keys, usage_events)
-- are not logged: the group commit's counter updates add no row. AUTOINCREMENT: a seq is never
-- reused, even once pruning has emptied the table, so `seq > last` never skips a row.
CREATE TABLE IF NOT EXISTS change_log (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    entity    TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    at        INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
);
-- The highest seq pruning has removed: a replica whose position is below it may have missed
-- rows and reloads the pool from a snapshot instead.
CREATE TABLE IF NOT EXISTS change_log_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS change_log_tiers_insert AFTER INSERT ON tiers BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tiers_update AFTER UPDATE ON tiers BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tiers_delete AFTER DELETE ON tiers BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', OLD.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_features_insert AFTER INSERT ON tier_features BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_features_update AFTER UPDATE ON tier_features BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_features_delete AFTER DELETE ON tier_features BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', OLD.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_feature_windows_insert AFTER INSERT ON feature_windows BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_feature_windows_update AFTER UPDATE ON feature_windows BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_feature_windows_delete AFTER DELETE ON feature_windows BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', OLD.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_upstreams_insert AFTER INSERT ON tier_upstreams BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_upstreams_update AFTER UPDATE ON tier_upstreams BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_upstreams_delete AFTER DELETE ON tier_upstreams BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', OLD.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_sources_insert AFTER INSERT ON tier_sources BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_sources_update AFTER UPDATE ON tier_sources BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_sources_delete AFTER DELETE ON tier_sources BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('tier', OLD.tier_id);
END;
-- keys: every column but the counters, the value hash and `is_active` (`UPDATE keys SET id = id`,
-- which each admin PATCH starts with, logs the key too). `is_active` is written with the key's
-- `key_health` row, which logs it as `health`; leaving it out keeps a health change to one row.
CREATE TRIGGER IF NOT EXISTS change_log_keys_insert AFTER INSERT ON keys BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('key', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_keys_update AFTER UPDATE OF id, name, key_value, tier_id, expires_at, usage_limit, usage_window_seconds, metadata_json ON keys BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('key', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_keys_delete AFTER DELETE ON keys BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('key', OLD.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_key_secrets_insert AFTER INSERT ON key_secrets BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('key', NEW.key_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_key_secrets_update AFTER UPDATE ON key_secrets BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('key', NEW.key_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_key_secrets_delete AFTER DELETE ON key_secrets BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('key', OLD.key_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_consumers_insert AFTER INSERT ON consumers BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('consumer', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_consumers_update AFTER UPDATE ON consumers BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('consumer', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_consumers_delete AFTER DELETE ON consumers BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('consumer', OLD.id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_consumer_scopes_insert AFTER INSERT ON consumer_scopes BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('consumer', NEW.consumer_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_consumer_scopes_update AFTER UPDATE ON consumer_scopes BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('consumer', NEW.consumer_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_consumer_scopes_delete AFTER DELETE ON consumer_scopes BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('consumer', OLD.consumer_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_key_health_insert AFTER INSERT ON key_health BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('health', NEW.key_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_key_health_update AFTER UPDATE ON key_health BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('health', NEW.key_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_key_health_delete AFTER DELETE ON key_health BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('health', OLD.key_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_health_insert AFTER INSERT ON tier_health BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('cooldown', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_health_update AFTER UPDATE ON tier_health BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('cooldown', NEW.tier_id);
END;
CREATE TRIGGER IF NOT EXISTS change_log_tier_health_delete AFTER DELETE ON tier_health BEGIN
    INSERT INTO change_log (entity, entity_id) VALUES ('cooldown', OLD.tier_id);
END;
