//! Issue 10 items 5–7: bulk import with a keyed value hash, encryption-key rotation
//! (`ENCRYPTION_KEY_PREVIOUS`, `POST /admin/rekey`, `keypooler rekey`), and their bad input.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use keypooler::crypto::Sealer;
use keypooler::secret::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, Resp, TestApp, ADMIN_TOKEN};

const KEY_A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const KEY_B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const KEY_C: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";

fn sealer(hex_key: &str) -> Sealer {
    let mut k = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut k).expect("hex key");
    Sealer::new(Some(k))
}

async fn import(app: &TestApp, body: Value) -> Resp {
    app.admin_post("/admin/keys/import", body).await
}

async fn rekey(app: &TestApp) -> Resp {
    app.admin_send(reqwest::Method::POST, "/admin/rekey", None)
        .await
}

fn statuses(r: &Resp) -> Vec<String> {
    r.body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results: {}", r.text))
        .iter()
        .map(|x| x["status"].as_str().expect("status").to_string())
        .collect()
}

/// Sets (or replaces) environment variables for the next restart.
fn set_env(app: &mut TestApp, vars: &[(&str, Option<&str>)]) {
    for (name, value) in vars {
        app.env.retain(|(k, _)| k != name);
        if let Some(v) = value {
            app.env.push((name.to_string(), v.to_string()));
        }
    }
}

/// Every stored key value and secret, as (id or id/name, stored text).
async fn stored_values(app: &TestApp) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = app
        .rows("SELECT id, key_value FROM keys")
        .await
        .into_iter()
        .map(|r| (r[0].clone().expect("id"), r[1].clone().expect("value")))
        .collect();
    out.extend(
        app.rows("SELECT key_id, name, value FROM key_secrets")
            .await
            .into_iter()
            .map(|r| {
                (
                    format!(
                        "{}/{}",
                        r[0].clone().expect("id"),
                        r[1].clone().expect("name")
                    ),
                    r[2].clone().expect("value"),
                )
            }),
    );
    out
}

on_both_drivers! {
    // Issue 10 items 1 and 5 together: PATCH rotating a value stores the new value's keyed
    // hash in the same write, so import finds the new value and no longer the old one.
    async fn a_rotated_value_is_what_import_matches() {
        let app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
        app.create_tier("t", &[("f", 1000, 60)]).await;
        let id = app.add_key(json!({ "name": "k", "key": "v-old", "tier": "t" })).await;
        let patched = app
            .admin_send(reqwest::Method::PATCH, &format!("/admin/keys/{id}"), Some(&json!({ "key": "v-new" })))
            .await;
        assert_eq!(patched.status, StatusCode::OK, "{}", patched.text);
        let hash = app.rows_with("SELECT value_hash FROM keys WHERE id = ?", &[&id]).await;
        assert_eq!(hash[0][0], Some(sealer(KEY_A).value_hash(&Secret::new("v-new"))));
        let r = import(&app, json!({ "tier": "t", "keys": [
            { "name": "again", "key": "v-new" },
            { "name": "old", "key": "v-old" },
        ], "dry_run": true })).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(statuses(&r), ["existing", "created"]);
        assert_eq!(r.body["results"][0]["id"], id.as_str());
    }

    // Issue 10 item 5: created / existing / invalid per item, dry run, the same file twice.
    async fn import_reports_each_item_and_is_idempotent() {
        let app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
        app.create_tier("t", &[("f", 1000, 60)]).await;
        app.create_tier("other", &[("g", 1000, 60)]).await;
        let before = app.add_key(json!({ "name": "old", "key": "v-existing", "tier": "t" })).await;
        // POST /admin/keys stores the keyed hash too.
        let hash = app.rows_with("SELECT value_hash FROM keys WHERE id = ?", &[&before]).await;
        assert_eq!(hash[0][0], Some(sealer(KEY_A).value_hash(&Secret::new("v-existing"))));

        let keys = json!([
            { "name": "a", "key": "v1" },
            { "name": "b", "key": "v-existing" },
            { "name": "c", "key": "v1" },
            { "name": " ", "key": "v2" },
            { "name": "d", "key": "v3", "usage_limit": 0 },
            { "name": "e", "key": "v4", "tier": "other" },
            { "name": "f", "key": "v5", "expires_at": "2000-01-01T00:00:00Z" },
            { "name": "g", "key": "v6", "tier": "t", "secrets": { "s": "sv" }, "metadata": { "m": 1 },
              "usage_limit": 5, "usage_window_seconds": 60 },
            { "name": "h", "key": "" },
        ]);
        let dry = import(&app, json!({ "tier": "t", "keys": keys, "dry_run": true })).await;
        assert_eq!(dry.status, StatusCode::OK, "{}", dry.text);
        let expected = ["created", "existing", "existing", "invalid", "invalid", "invalid", "invalid", "created", "invalid"];
        assert_eq!(statuses(&dry), expected);
        assert_eq!((dry.body["created"].as_u64(), dry.body["existing"].as_u64(), dry.body["invalid"].as_u64()), (Some(2), Some(2), Some(5)));
        assert_eq!(dry.body["dry_run"], true);
        assert_eq!(dry.body["results"][0]["id"], Value::Null, "a dry run creates nothing");
        assert_eq!(dry.body["results"][1]["id"], before.as_str());
        assert_eq!(dry.body["results"][2]["reason"], "same value as item 0");
        assert!(dry.body["results"][3]["reason"].as_str().expect("reason").contains("name"), "{}", dry.text);
        assert!(dry.body["results"][4]["reason"].as_str().expect("reason").contains("usage_limit"));
        assert!(dry.body["results"][5]["reason"].as_str().expect("reason").contains("tier"));
        assert!(dry.body["results"][6]["reason"].as_str().expect("reason").contains("expires_at"));
        assert!(dry.body["results"][8]["reason"].as_str().expect("reason").contains("key"));
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 1, "dry run changed nothing");

        let real = import(&app, json!({ "tier": "t", "keys": keys })).await;
        assert_eq!(real.status, StatusCode::OK, "{}", real.text);
        assert_eq!(statuses(&real), expected);
        assert_eq!(real.body["dry_run"], false);
        let a_id = real.body["results"][0]["id"].as_str().expect("id").to_string();
        assert_eq!(real.body["results"][2]["id"], a_id.as_str(), "the duplicate points at the first");
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 3);
        assert_eq!(app.count("SELECT COUNT(*) FROM key_secrets").await, 1);
        assert_eq!(app.count("SELECT COUNT(*) FROM keys WHERE value_hash IS NULL").await, 0);
        assert_eq!(app.count("SELECT COUNT(*) FROM keys WHERE key_value NOT LIKE 'enc:gcm:%'").await, 0);

        // The pool follows at once: all three values serve, with the imported secret.
        let mut seen = BTreeMap::new();
        for _ in 0..6 {
            let r = app.draw("f", ADMIN_TOKEN).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            seen.insert(r.body["value"].as_str().expect("value").to_string(), r.body["secrets"].clone());
        }
        assert_eq!(seen.keys().map(String::as_str).collect::<Vec<_>>(), ["v-existing", "v1", "v6"]);
        assert_eq!(seen["v6"], json!({ "s": "sv" }));
        let listed = app.admin_get("/admin/keys").await;
        let g = listed.body.as_array().expect("keys").iter().find(|k| k["name"] == "g").expect("g");
        assert_eq!((g["usage_limit"].as_i64(), g["usage_window_seconds"].as_i64()), (Some(5), Some(60)));
        assert_eq!(g["metadata"], json!({ "m": 1 }));

        // The same file again creates nothing.
        let again = import(&app, json!({ "tier": "t", "keys": keys })).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text);
        assert_eq!(statuses(&again), ["existing", "existing", "existing", "invalid", "invalid", "invalid", "invalid", "existing", "invalid"]);
        assert_eq!(again.body["results"][0]["id"], a_id.as_str());
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 3);
        // The same value in another tier is a new key there.
        let elsewhere = import(&app, json!({ "tier": "other", "keys": [{ "name": "a", "key": "v1" }] })).await;
        assert_eq!(statuses(&elsewhere), ["created"]);
    }

    // Issue 10 item 7: a request of the wrong shape is refused whole, naming the field.
    async fn import_bad_requests_are_refused_whole() {
        let app = spawn_app().await;
        app.create_tier("t", &[("f", 10, 60)]).await;
        let too_many: Vec<Value> = (0..10_001).map(|i| json!({ "name": format!("k{i}"), "key": format!("v{i}") })).collect();
        let cases = [
            (json!({ "tier": "t", "keys": too_many }), StatusCode::BAD_REQUEST, "keys"),
            (json!({ "tier": "t", "keys": [{ "name": "a", "key": "v" }, { "name": "a", "key": "v", "usage_limit": "x" }] }), StatusCode::BAD_REQUEST, "keys[1].usage_limit"),
            (json!({ "tier": "t", "keys": [{ "name": "a", "key": "v", "usage_limit": 2.5 }] }), StatusCode::BAD_REQUEST, "keys[0].usage_limit"),
            (json!({ "tier": "t", "keys": [{ "name": "a", "key": "v", "colour": 1 }] }), StatusCode::BAD_REQUEST, "colour"),
            (json!({ "tier": "t", "keys": [{ "name": "a" }] }), StatusCode::BAD_REQUEST, "keys[0]: missing field `key`"),
            (json!({ "tier": "t", "keys": [{ "name": null, "key": "v" }] }), StatusCode::BAD_REQUEST, "keys[0].name"),
            (json!({ "tier": "t", "keys": [{ "name": "a", "key": "v", "metadata": "m" }] }), StatusCode::BAD_REQUEST, "keys[0].metadata"),
            (json!({ "tier": "t", "keys": [{ "name": "a", "key": "v", "secrets": { "s": 1 } }] }), StatusCode::BAD_REQUEST, "keys[0].secrets"),
            (json!({ "tier": "t", "keys": ["v"] }), StatusCode::BAD_REQUEST, "keys[0]"),
            (json!({ "tier": null, "keys": [] }), StatusCode::BAD_REQUEST, "tier"),
            (json!({ "tier": "t", "keys": null }), StatusCode::BAD_REQUEST, "keys"),
            (json!({ "tier": "t", "keys": [], "dry_run": null }), StatusCode::BAD_REQUEST, "dry_run"),
            (json!({ "tier": "", "keys": [] }), StatusCode::BAD_REQUEST, "tier"),
            (json!({ "tier": "nope", "keys": [{ "name": "a", "key": "v" }] }), StatusCode::NOT_FOUND, "nope"),
        ];
        for (body, status, names) in cases {
            let r = import(&app, body).await;
            assert_eq!(r.status, status, "{}", r.text);
            assert!(r.error().contains(names), "{names}: {}", r.error());
        }
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 0, "nothing half-applied");
        let empty = import(&app, json!({ "tier": "t", "keys": [] })).await;
        assert_eq!(empty.status, StatusCode::OK, "{}", empty.text);
        assert_eq!(empty.body["created"], 0);
    }

    // Issue 10 item 5: 10,000 keys in one request (over the 1 MiB body limit of other routes),
    // then the same file again creates nothing. The time is printed, never asserted.
    async fn ten_thousand_keys_import_once() {
        let app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
        app.create_tier("bulk", &[("f", 10, 60)]).await;
        let keys: Vec<Value> = (0..10_000)
            .map(|i| json!({ "name": format!("bulk-{i:05}"), "key": format!("fc-bulk-value-{i:05}-0123456789abcdef"),
                             "usage_limit": 1000, "secrets": { "webhook": format!("whsec-{i:05}") } }))
            .collect();
        let body = json!({ "tier": "bulk", "keys": keys });
        assert!(body.to_string().len() > 1024 * 1024, "the file is over the global body limit");
        let started = Instant::now();
        let first = import(&app, body.clone()).await;
        let first_took = started.elapsed();
        assert_eq!(first.status, StatusCode::OK, "{}", &first.text[..first.text.len().min(300)]);
        assert_eq!(first.body["created"], 10_000);
        let started = Instant::now();
        let second = import(&app, body).await;
        let second_took = started.elapsed();
        assert_eq!(second.body["created"], 0);
        assert_eq!(second.body["existing"], 10_000);
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 10_000);
        assert_eq!(app.count("SELECT COUNT(*) FROM key_secrets").await, 10_000);
        assert_eq!(app.admin_get("/admin/health").await.body["pool_size"], 10_000);
        eprintln!(
            "import of 10,000 keys ({:?}): first {} ms, again {} ms",
            crate::helpers::backend(),
            first_took.as_millis(),
            second_took.as_millis()
        );
    }

    // Issue 10 item 5: keys stored before the hash existed (or with a hash under another key)
    // get it at startup, from the values the pool decrypted; import then finds them.
    async fn existing_keys_get_their_hash_at_startup() {
        let mut app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
        app.create_tier("t", &[("f", 10, 60)]).await;
        let a = app.add_key(json!({ "name": "a", "key": "va", "tier": "t" })).await;
        let b = app.add_key(json!({ "name": "b", "key": "vb", "tier": "t" })).await;
        app.rows_with("UPDATE keys SET value_hash = NULL WHERE id = ?", &[&a]).await;
        app.rows_with("UPDATE keys SET value_hash = 'stale' WHERE id = ?", &[&b]).await;
        app.restart().await;
        let hashes: BTreeMap<String, Option<String>> = app.rows("SELECT id, value_hash FROM keys").await
            .into_iter().map(|r| (r[0].clone().expect("id"), r[1].clone())).collect();
        let s = sealer(KEY_A);
        assert_eq!(hashes[&a], Some(s.value_hash(&Secret::new("va"))));
        assert_eq!(hashes[&b], Some(s.value_hash(&Secret::new("vb"))));
        let r = import(&app, json!({ "tier": "t", "keys": [{ "name": "x", "key": "va" }, { "name": "y", "key": "vb" }] })).await;
        assert_eq!(statuses(&r), ["existing", "existing"], "{}", r.text);
    }

    // Issue 10 item 6: plaintext → key A → key B (A previous) → rekey → B alone: every value
    // and secret opens, plaintext rows are sealed, hashes follow the key, rekey is idempotent;
    // a key no configured key opens is counted in /admin/health and by rekey.
    async fn rotation_reseals_everything_under_the_new_key() {
        let mut app = spawn_app().await;
        app.create_tier("t", &[("f", 1000, 60)]).await;
        let plain = app.add_key(json!({ "name": "p", "key": "v-plain", "tier": "t", "secrets": { "s": "s-plain" } })).await;
        set_env(&mut app, &[("ENCRYPTION_KEY", Some(KEY_A))]);
        app.restart().await;
        let under_a = app.add_key(json!({ "name": "a", "key": "v-a", "tier": "t", "secrets": { "s": "s-a" } })).await;
        assert_eq!(app.count("SELECT COUNT(*) FROM keys WHERE key_value LIKE 'enc:gcm:%'").await, 1);

        set_env(&mut app, &[("ENCRYPTION_KEY", Some(KEY_B)), ("ENCRYPTION_KEY_PREVIOUS", Some(KEY_A))]);
        app.restart().await;
        assert_eq!(app.admin_get("/admin/health").await.body["unreadable_keys"], 0);
        // As if an earlier rekey was interrupted after one row: that row is counted current.
        let b = sealer(KEY_B);
        let done = b.seal(&Secret::new("s-plain")).expect("seal");
        app.rows_with("UPDATE key_secrets SET value = ? WHERE key_id = ?", &[&done, &plain]).await;
        let first = rekey(&app).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text);
        assert_eq!(first.body, json!({ "resealed": 3, "already_current": 1, "unreadable": 0,
                                       "changed_meanwhile": 0, "hashes_updated": 0 }), "{}", first.text);
        // (Startup already recomputed every readable key's hash under B from the pool.)
        let second = rekey(&app).await;
        assert_eq!(second.body, json!({ "resealed": 0, "already_current": 4, "unreadable": 0,
                                        "changed_meanwhile": 0, "hashes_updated": 0 }), "{}", second.text);
        for (what, stored) in stored_values(&app).await {
            assert!(stored.starts_with("enc:gcm:"), "{what} sealed");
            b.open(&stored).unwrap_or_else(|e| panic!("{what} opens with B alone: {e}"));
        }
        let hashes: BTreeMap<String, Option<String>> = app.rows("SELECT id, value_hash FROM keys").await
            .into_iter().map(|r| (r[0].clone().expect("id"), r[1].clone())).collect();
        assert_eq!(hashes[&plain], Some(b.value_hash(&Secret::new("v-plain"))));
        assert_eq!(hashes[&under_a], Some(b.value_hash(&Secret::new("v-a"))));

        set_env(&mut app, &[("ENCRYPTION_KEY_PREVIOUS", None)]);
        app.restart().await;
        assert_eq!(app.admin_get("/admin/health").await.body["unreadable_keys"], 0);
        let mut seen = BTreeMap::new();
        for _ in 0..4 {
            let r = app.draw("f", ADMIN_TOKEN).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            seen.insert(r.body["value"].as_str().expect("value").to_string(), r.body["secrets"]["s"].clone());
        }
        assert_eq!(seen, BTreeMap::from([("v-a".to_string(), json!("s-a")), ("v-plain".to_string(), json!("s-plain"))]));
        let r = import(&app, json!({ "tier": "t", "keys": [{ "name": "x", "key": "v-plain" }] })).await;
        assert_eq!(statuses(&r), ["existing"], "{}", r.text);

        // A key that neither opens: counted, never served, left alone by rekey.
        set_env(&mut app, &[("ENCRYPTION_KEY", Some(KEY_C))]);
        app.restart().await;
        assert_eq!(app.admin_get("/admin/health").await.body["unreadable_keys"], 2);
        let blind = rekey(&app).await;
        assert_eq!(blind.body["unreadable"], 4, "{}", blind.text);
        assert_eq!(blind.body["resealed"], 0, "{}", blind.text);
        assert!(!blind.text.contains("v-a") && !blind.text.contains("s-plain"));
    }

    // Issue 10 item 6: a re-seal changes a row only where it still holds the value rekey read,
    // so a value rotated between the read and the write keeps its rotation.
    async fn reseal_never_overwrites_a_value_changed_meanwhile() {
        let mut app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
        app.create_tier("t", &[("f", 10, 60)]).await;
        let id = app.add_key(json!({ "name": "a", "key": "v-a", "tier": "t", "secrets": { "s": "s-a" } })).await;
        app.stop().await;
        let config = keypooler::config::Config::from_vars(app.env.clone()).expect("config");
        let db = keypooler::store::Db::open(&config).await.expect("db");
        let stored = app.scalar(&format!("SELECT key_value FROM keys WHERE id = '{id}'")).await;
        let secret = app.scalar(&format!("SELECT value FROM key_secrets WHERE key_id = '{id}'")).await;
        let stale = |old: &str| vec![(id.clone(), old.to_string(), "new".to_string(), "h".to_string())];
        let (keys, hashes, secrets) = db
            .reseal(&stale("not what is stored"), &[], &[(id.clone(), "s".into(), "not it".into(), "new".into())])
            .await
            .expect("reseal");
        assert_eq!((keys, hashes, secrets), (0, 0, 0));
        assert_eq!(app.scalar(&format!("SELECT key_value FROM keys WHERE id = '{id}'")).await, stored);
        assert_eq!(app.scalar(&format!("SELECT value FROM key_secrets WHERE key_id = '{id}'")).await, secret);
        let (keys, _, secrets) = db
            .reseal(&stale(&stored), &[], &[(id.clone(), "s".into(), secret.clone(), "new".into())])
            .await
            .expect("reseal");
        assert_eq!((keys, secrets), (1, 1));
        db.close().await;
    }

    // Issue 10 item 6: rekey while /key is under load from concurrent callers: no serve
    // fails or returns a wrong value, and afterwards every row opens with the new key alone.
    async fn rekey_under_load_loses_nothing() {
        let mut app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
        app.create_tier("t", &[("f", 1_000_000, 60)]).await;
        let keys: Vec<Value> = (0..600)
            .map(|i| json!({ "name": format!("k{i}"), "key": format!("value-{i}"), "secrets": { "s": format!("secret-{i}") } }))
            .collect();
        let r = import(&app, json!({ "tier": "t", "keys": keys })).await;
        assert_eq!(r.body["created"], 600, "{}", &r.text[..r.text.len().min(300)]);
        set_env(&mut app, &[("ENCRYPTION_KEY", Some(KEY_B)), ("ENCRYPTION_KEY_PREVIOUS", Some(KEY_A))]);
        app.restart().await;
        let (_, token) = app.consumer("loader", &["t"]).await;

        let app = Arc::new(app);
        let stop = Arc::new(AtomicBool::new(false));
        let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (app, stop, served, failed, token) = (app.clone(), stop.clone(), served.clone(), failed.clone(), token.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = app.draw("f", &token).await;
                        let value = r.body["value"].as_str().unwrap_or_default();
                        let secret = r.body["secrets"]["s"].as_str().unwrap_or_default();
                        let ok = r.status == StatusCode::OK
                            && value.strip_prefix("value-") == secret.strip_prefix("secret-");
                        if ok { served.fetch_add(1, Ordering::Relaxed); } else { failed.fetch_add(1, Ordering::Relaxed); }
                    }
                })
            })
            .collect();
        // Bounded wait until the load runs, then rekey in the middle of it.
        for _ in 0..200 {
            if served.load(Ordering::Relaxed) >= 20 { break; }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let report = rekey(&app).await;
        let during = served.load(Ordering::Relaxed);
        let more = during + 20;
        for _ in 0..200 {
            if served.load(Ordering::Relaxed) >= more { break; }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for c in callers { c.await.expect("caller"); }
        assert_eq!(report.status, StatusCode::OK, "{}", report.text);
        assert_eq!(report.body["resealed"], 1200, "{}", report.text);
        assert_eq!(failed.load(Ordering::Relaxed), 0, "no serve failed or mixed values");
        assert!(served.load(Ordering::Relaxed) >= more, "the load kept running");
        let served_total = served.load(Ordering::Relaxed) as i64;
        assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, served_total, "every serve audited");

        let mut app = Arc::try_unwrap(app).ok().expect("sole owner");
        let b = sealer(KEY_B);
        let values = stored_values(&app).await;
        assert_eq!(values.len(), 1200);
        for (what, stored) in values {
            b.open(&stored).unwrap_or_else(|e| panic!("{what} opens with B alone: {e}"));
        }
        set_env(&mut app, &[("ENCRYPTION_KEY_PREVIOUS", None)]);
        app.restart().await;
        assert_eq!(app.admin_get("/admin/health").await.body["unreadable_keys"], 0);
        let used: i64 = app.count("SELECT SUM(usage_count) FROM keys").await;
        assert_eq!(used, served_total, "no counter lost to the re-seal");
    }
}

// Issue 10 item 6: `keypooler rekey` re-seals a database file in place and prints its counts;
// a bad ENCRYPTION_KEY_PREVIOUS stops it with the variable named and the value never echoed.
#[tokio::test]
async fn rekey_subcommand_reseals_a_file() {
    let mut app = spawn_app_with(&[("ENCRYPTION_KEY", KEY_A)]).await;
    app.create_tier("t", &[("f", 10, 60)]).await;
    app.add_key(json!({ "name": "a", "key": "v-a", "tier": "t", "secrets": { "s": "s-a" } }))
        .await;
    app.stop().await;
    let db_path = app.db_path.display().to_string();
    let run = |vars: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_keypooler"));
        c.arg("rekey")
            .env_clear()
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("DB_PATH", &db_path)
            .env("LOG_LEVEL", "error");
        for (k, v) in vars {
            c.env(k, v);
        }
        c.output().expect("run keypooler rekey")
    };
    let bad = run(&[
        ("ENCRYPTION_KEY", KEY_B),
        ("ENCRYPTION_KEY_PREVIOUS", "not-a-key-123"),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("ENCRYPTION_KEY_PREVIOUS"), "{stderr}");
    assert!(!stderr.contains("not-a-key-123"), "{stderr}");

    let out = run(&[
        ("ENCRYPTION_KEY", KEY_B),
        ("ENCRYPTION_KEY_PREVIOUS", KEY_A),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(report["resealed"], 2, "{report}");
    assert_eq!(report["unreadable"], 0, "{report}");
    let again = run(&[
        ("ENCRYPTION_KEY", KEY_B),
        ("ENCRYPTION_KEY_PREVIOUS", KEY_A),
    ]);
    let report: Value = serde_json::from_slice(&again.stdout).expect("one JSON line");
    assert_eq!(
        (
            report["resealed"].as_u64(),
            report["already_current"].as_u64()
        ),
        (Some(0), Some(2))
    );
    let b = sealer(KEY_B);
    for (what, stored) in stored_values(&app).await {
        b.open(&stored)
            .unwrap_or_else(|e| panic!("{what} opens with B: {e}"));
    }
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("v-a"),
        "no value printed"
    );
    // The server starts on the file with B alone and serves the value.
    set_env(&mut app, &[("ENCRYPTION_KEY", Some(KEY_B))]);
    app.restart().await;
    let r = app.draw("f", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["value"], "v-a");
    assert_eq!(r.body["secrets"]["s"], "s-a");
}

// Issue 10 item 6: a bad ENCRYPTION_KEY_PREVIOUS stops the server too, naming the variable.
#[test]
fn bad_previous_key_is_a_startup_error_naming_the_variable() {
    let e = keypooler::config::Config::from_vars([
        ("ADMIN_TOKEN".to_string(), "t".to_string()),
        ("ENCRYPTION_KEY".to_string(), KEY_A.to_string()),
        (
            "ENCRYPTION_KEY_PREVIOUS".to_string(),
            format!("{KEY_B},zz{}", &KEY_C[2..]),
        ),
    ])
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("ENCRYPTION_KEY_PREVIOUS") && e.contains("entry 2"),
        "{e}"
    );
    assert!(!e.contains(KEY_B) && !e.contains(&KEY_C[2..]), "{e}");
}

// Issue 10 item 7: the import's schema states its limit (from the handler's constant) and the
// item shape, and every reference of its operations resolves.
#[tokio::test]
async fn import_schema_states_the_limit_and_the_item_shape() {
    let app = spawn_app().await;
    let doc = app.get("/openapi.json", None).await.body;
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str() {
            Some(r) => doc["components"]["schemas"][r.rsplit('/').next().expect("name")].clone(),
            None => v.clone(),
        }
    };
    let body = resolve(
        &doc["paths"]["/admin/keys/import"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"],
    );
    let keys = &body["properties"]["keys"];
    assert_eq!(keys["maxItems"], keypooler::api::MAX_IMPORT_KEYS, "{body}");
    let item = resolve(&keys["items"]);
    assert_eq!(item["additionalProperties"], false, "{item}");
    assert_eq!(item["required"], json!(["name", "key"]), "{item}");
    assert_eq!(body["additionalProperties"], false, "{body}");
    let mine = json!([
        doc["paths"]["/admin/keys/import"],
        doc["paths"]["/admin/rekey"],
        body,
        item
    ]);
    let text = mine.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().expect("name");
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling $ref {name}"
        );
    }
    assert!(doc["paths"]["/admin/rekey"]["post"]["responses"]["200"].is_object());
}
