//! Encryption-key rotation and keyed value hashes (SPEC §8.3): re-sealing every stored value
//! under `ENCRYPTION_KEY` (`POST /admin/rekey`, `keypooler rekey`) and filling in
//! `keys.value_hash` from the values the pool already holds.
//!
//! Guarantees: rekey works in batches, each its own transaction, and changes a row only where
//! it still holds the value that was read (so a value rotated meanwhile keeps its rotation);
//! running it again (after an interruption, or twice) re-seals only what is not yet under the
//! current key. Plaintext never changes, so the pool — which holds plaintext — is untouched.

use serde::Serialize;
use utoipa::ToSchema;

use crate::crypto::{OpenedWith, Sealer};
use crate::pool::Pool;
use crate::store::{Db, StoreError};

/// Rows read and written per rekey transaction (and per hash backfill transaction).
pub const BATCH: usize = 500;

/// What a rekey did, counted per stored value (key values and bound secrets).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct RekeyReport {
    /// Values re-sealed under `ENCRYPTION_KEY` (plaintext or under a previous key before).
    #[schema(minimum = 0)]
    pub resealed: u64,
    /// Values already sealed under `ENCRYPTION_KEY` (or plaintext with encryption off).
    #[schema(minimum = 0)]
    pub already_current: u64,
    /// Values no configured key opens; left as they are (their key ids are logged).
    #[schema(minimum = 0)]
    pub unreadable: u64,
    /// Values rotated by another writer between read and write; they already carry that
    /// writer's sealing (run rekey again to check them).
    #[schema(minimum = 0)]
    pub changed_meanwhile: u64,
    /// Keys whose value hash was recomputed (it is keyed by `ENCRYPTION_KEY`).
    #[schema(minimum = 0)]
    pub hashes_updated: u64,
}

/// `(id, old, new, hash)` or `(key id, name, old, new)`.
type Change = (String, String, String, String);

/// Re-seals every key value and secret under the sealer's current key, `BATCH` rows per
/// transaction, and recomputes stale value hashes. Without `ENCRYPTION_KEY`, plaintext is the
/// current form: nothing is sealed, hashes are still brought up to date.
pub async fn rekey(db: &Db, sealer: &Sealer) -> Result<RekeyReport, StoreError> {
    let mut report = RekeyReport::default();
    let limit = BATCH as i64;
    let mut after = String::new();
    loop {
        let page = db.keys_page(&after, limit).await?;
        let Some(last) = page.last() else { break };
        after = last.0.clone();
        let (mut resealed, mut hash_only) = (Vec::new(), Vec::new());
        let mut rehashed_with_sealing = 0u64;
        for (id, stored, hash) in page {
            let (plain, which) = match sealer.open_which(&stored) {
                Ok(opened) => opened,
                Err(e) => {
                    report.unreadable += 1;
                    tracing::warn!(key_id = %id, error = %e, "rekey: key value cannot be opened; left as it is");
                    continue;
                }
            };
            let fresh_hash = sealer.value_hash(&plain);
            if needs_sealing(sealer, which) {
                let sealed = sealer
                    .seal(&plain)
                    .map_err(|e| StoreError::Other(e.to_string()))?;
                if hash.as_deref() != Some(fresh_hash.as_str()) {
                    rehashed_with_sealing += 1;
                }
                resealed.push((id, stored, sealed, fresh_hash));
            } else {
                report.already_current += 1;
                if hash.as_deref() != Some(fresh_hash.as_str()) {
                    hash_only.push((id, stored.clone(), stored, fresh_hash));
                }
            }
        }
        let wanted = (resealed.len() + hash_only.len()) as u64;
        let (sealed, hashed, _) = db.reseal(&resealed, &hash_only, &[]).await?;
        report.resealed += sealed;
        report.hashes_updated += hashed + rehashed_with_sealing.min(sealed);
        report.changed_meanwhile += wanted - (sealed + hashed).min(wanted);
    }
    let mut after = (String::new(), String::new());
    loop {
        let page = db.secrets_page((&after.0, &after.1), limit).await?;
        let Some(last) = page.last() else { break };
        after = (last.0.clone(), last.1.clone());
        let mut resealed: Vec<Change> = Vec::new();
        for (key_id, name, stored) in page {
            match sealer.open_which(&stored) {
                Ok((plain, which)) if needs_sealing(sealer, which) => {
                    let sealed = sealer
                        .seal(&plain)
                        .map_err(|e| StoreError::Other(e.to_string()))?;
                    resealed.push((key_id, name, stored, sealed));
                }
                Ok(_) => report.already_current += 1,
                Err(e) => {
                    report.unreadable += 1;
                    tracing::warn!(key_id = %key_id, error = %e, "rekey: a secret cannot be opened; left as it is");
                }
            }
        }
        let wanted = resealed.len() as u64;
        let (_, _, sealed) = db.reseal(&[], &[], &resealed).await?;
        report.resealed += sealed;
        report.changed_meanwhile += wanted - sealed.min(wanted);
    }
    tracing::info!(
        resealed = report.resealed,
        already_current = report.already_current,
        unreadable = report.unreadable,
        changed_meanwhile = report.changed_meanwhile,
        hashes_updated = report.hashes_updated,
        "rekey finished"
    );
    Ok(report)
}

fn needs_sealing(sealer: &Sealer, which: OpenedWith) -> bool {
    match which {
        OpenedWith::Current => false,
        OpenedWith::Plain => sealer.enabled(),
        OpenedWith::Previous(_) => true,
    }
}

/// Fills in (or recomputes) `keys.value_hash` from the plaintext the pool decrypted at load,
/// so no row is decrypted again and `/key` never waits for it (this runs before serving).
/// Keys the pool cannot read keep what they have. Returns how many hashes were written.
pub async fn backfill_value_hashes(
    db: &Db,
    pool: &Pool,
    sealer: &Sealer,
) -> Result<usize, StoreError> {
    let stored: std::collections::HashMap<String, Option<String>> =
        db.key_value_hashes().await?.into_iter().collect();
    let mut stale = Vec::new();
    for key in pool.keys() {
        let Ok(material) = &key.material else {
            continue;
        };
        let hash = sealer.value_hash(&material.value);
        if stored.get(&*key.id).cloned().flatten().as_deref() != Some(hash.as_str()) {
            stale.push((key.id.to_string(), hash));
        }
    }
    for chunk in stale.chunks(BATCH) {
        db.set_value_hashes(chunk).await?;
    }
    if !stale.is_empty() {
        tracing::info!(keys = stale.len(), "value hashes filled in");
    }
    Ok(stale.len())
}
