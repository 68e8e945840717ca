//! The sealer (SPEC §4): values at rest are plaintext or `enc:gcm:` + hex(nonce ‖ ciphertext ‖ tag),
//! AES-256-GCM without associated data — byte-for-byte the Go service's format.
//!
//! Rotation (SPEC §8.3): writes seal under `ENCRYPTION_KEY`; reads try it, then each key of
//! `ENCRYPTION_KEY_PREVIOUS` (GCM's tag tells which fits). Keyed value hashes (bulk import's
//! duplicate check) are HMAC-SHA256 under a key derived from `ENCRYPTION_KEY`.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

const TAG: &str = "enc:gcm:";
const NONCE_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;

/// Why a stored value cannot be read. Never carries the value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("value is encrypted (enc:gcm:) but ENCRYPTION_KEY is not set")]
    NoKey,
    #[error("encrypted value is malformed ({0})")]
    Malformed(&'static str),
    #[error("encrypted value failed authentication (wrong ENCRYPTION_KEY or tampered data)")]
    Authentication,
    #[error("encryption failed")]
    Encrypt,
}

/// Which configured key opened a stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenedWith {
    /// Stored in plaintext (no tag).
    Plain,
    /// `ENCRYPTION_KEY`.
    Current,
    /// `ENCRYPTION_KEY_PREVIOUS` (its position in the list).
    Previous(usize),
}

/// Derives the value-hash key from `ENCRYPTION_KEY`, so a hash says nothing to whoever lacks
/// the key, and changes (is recomputed) when the key does.
const HASH_KEY_CONTEXT: &[u8] = b"keypooler/value-hash/v1";
/// The hash key without `ENCRYPTION_KEY`. Values sit in plaintext in the same row then, so a
/// hash keyed by a public constant reveals nothing the row does not; once `ENCRYPTION_KEY` is
/// set, startup and rekey recompute every hash under the derived key.
const PLAINTEXT_HASH_KEY: &[u8] = b"keypooler/value-hash/plaintext/v1";

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return Sha256::digest([key, message].concat()).into(),
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Seals new writes when a key is configured; opens both kinds of stored value, under the
/// current key or any previous one.
#[derive(Clone)]
pub struct Sealer {
    cipher: Option<Aes256Gcm>,
    previous: Vec<Aes256Gcm>,
    hash_key: [u8; 32],
}

impl Sealer {
    pub fn new(key: Option<[u8; 32]>) -> Self {
        Sealer::with_previous(key, &[])
    }

    /// `key` seals and opens; each of `previous` only opens (tried in order after `key`).
    pub fn with_previous(key: Option<[u8; 32]>, previous: &[[u8; 32]]) -> Self {
        let hash_key = match &key {
            Some(k) => hmac_sha256(k, HASH_KEY_CONTEXT),
            None => hmac_sha256(PLAINTEXT_HASH_KEY, HASH_KEY_CONTEXT),
        };
        Sealer {
            cipher: key.map(|k| Aes256Gcm::new(&k.into())),
            previous: previous
                .iter()
                .map(|k| Aes256Gcm::new(&(*k).into()))
                .collect(),
            hash_key,
        }
    }

    /// The keyed hash of a key's value as stored in `keys.value_hash` (64 lowercase hex):
    /// HMAC-SHA256 under a key derived from `ENCRYPTION_KEY` (see `PLAINTEXT_HASH_KEY` without
    /// one). Equal values in one tier have equal hashes, which is how import finds duplicates.
    pub fn value_hash(&self, value: &Secret) -> String {
        hex::encode(hmac_sha256(&self.hash_key, value.expose().as_bytes()))
    }

    /// Whether new writes are encrypted.
    pub fn enabled(&self) -> bool {
        self.cipher.is_some()
    }

    /// The form to store: tagged ciphertext with a fresh random nonce, or the plaintext as given.
    pub fn seal(&self, plaintext: &Secret) -> Result<String, SealError> {
        let Some(cipher) = &self.cipher else {
            return Ok(plaintext.expose().to_string());
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.expose().as_bytes())
            .map_err(|_| SealError::Encrypt)?;
        let mut out = String::with_capacity(TAG.len() + 2 * (NONCE_LEN + sealed.len()));
        out.push_str(TAG);
        out.push_str(&hex::encode(nonce));
        out.push_str(&hex::encode(sealed));
        Ok(out)
    }

    /// The plaintext of a stored value: decrypted iff it carries the tag.
    pub fn open(&self, stored: &str) -> Result<Secret, SealError> {
        self.open_which(stored).map(|(plain, _)| plain)
    }

    /// The plaintext and which key opened it. A value no configured key opens fails
    /// authentication (`NoKey` when no key is configured at all).
    pub fn open_which(&self, stored: &str) -> Result<(Secret, OpenedWith), SealError> {
        let Some(hex_body) = stored.strip_prefix(TAG) else {
            return Ok((Secret::new(stored), OpenedWith::Plain));
        };
        if self.cipher.is_none() && self.previous.is_empty() {
            return Err(SealError::NoKey);
        }
        let raw = hex::decode(hex_body).map_err(|_| SealError::Malformed("not hex"))?;
        if raw.len() < NONCE_LEN + GCM_TAG_LEN {
            return Err(SealError::Malformed("too short"));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let candidates = self.cipher.iter().map(|c| (c, OpenedWith::Current)).chain(
            self.previous
                .iter()
                .enumerate()
                .map(|(i, c)| (c, OpenedWith::Previous(i))),
        );
        for (cipher, which) in candidates {
            if let Ok(plain) = cipher.decrypt(Nonce::from_slice(nonce), sealed) {
                return String::from_utf8(plain)
                    .map(|p| (Secret::new(p), which))
                    .map_err(|_| SealError::Malformed("plaintext is not UTF-8"));
            }
        }
        Err(SealError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; 32] {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        k
    }

    /// Made with Python's `cryptography` AESGCM (key 00..1f, nonce a0..ab, no AAD).
    const VECTOR: &str = "enc:gcm:a0a1a2a3a4a5a6a7a8a9aaab807b51412cbd67921100e4a1620eedef429febbaa36a5fb0640569dd0098c66a3d47";

    #[test]
    fn opens_a_vector_from_an_independent_implementation() {
        let s = Sealer::new(Some(key()));
        assert_eq!(s.open(VECTOR).unwrap().expose(), "fc-live-secret-123");
    }

    #[test]
    fn seal_then_open_round_trips_with_fresh_nonces() {
        let s = Sealer::new(Some(key()));
        let a = s.seal(&Secret::new("fc-live-secret-123")).unwrap();
        let b = s.seal(&Secret::new("fc-live-secret-123")).unwrap();
        assert!(a.starts_with("enc:gcm:") && a != b);
        // nonce 12 + plaintext 18 + tag 16 bytes, hex encoded, lowercase
        assert_eq!(a.len(), 8 + 2 * (12 + 18 + 16));
        assert_eq!(a, a.to_lowercase());
        assert_eq!(s.open(&a).unwrap().expose(), "fc-live-secret-123");
    }

    #[test]
    fn sealed_format_matches_the_vector_layout() {
        // Our ciphertext for the vector's nonce equals the independent one byte for byte.
        let cipher = Aes256Gcm::new(&key().into());
        let nonce: Vec<u8> = (0xa0u8..0xac).collect();
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), b"fc-live-secret-123".as_ref())
            .unwrap();
        assert_eq!(
            format!("enc:gcm:{}{}", hex::encode(&nonce), hex::encode(sealed)),
            VECTOR
        );
    }

    #[test]
    fn plaintext_passes_through_both_ways() {
        let off = Sealer::new(None);
        assert_eq!(off.seal(&Secret::new("plain")).unwrap(), "plain");
        assert_eq!(off.open("plain").unwrap().expose(), "plain");
        let on = Sealer::new(Some(key()));
        assert_eq!(
            on.open("untagged-legacy").unwrap().expose(),
            "untagged-legacy"
        );
    }

    #[test]
    fn wrong_key_fails_authentication() {
        let mut other = key();
        other[0] ^= 1;
        assert_eq!(
            Sealer::new(Some(other)).open(VECTOR).unwrap_err(),
            SealError::Authentication
        );
    }

    #[test]
    fn tampered_and_truncated_values_are_refused() {
        let s = Sealer::new(Some(key()));
        let mut tampered = VECTOR.to_string();
        tampered.replace_range(30..31, if &VECTOR[30..31] == "0" { "1" } else { "0" });
        assert_eq!(s.open(&tampered).unwrap_err(), SealError::Authentication);
        assert_eq!(
            s.open(&VECTOR[..VECTOR.len() - 2]).unwrap_err(),
            SealError::Authentication
        );
        assert!(matches!(
            s.open("enc:gcm:a0a1a2").unwrap_err(),
            SealError::Malformed(_)
        ));
        assert!(matches!(
            s.open("enc:gcm:zz").unwrap_err(),
            SealError::Malformed(_)
        ));
        assert!(matches!(
            s.open("enc:gcm:abc").unwrap_err(),
            SealError::Malformed(_)
        ));
    }

    #[test]
    fn previous_keys_open_and_say_which_key_fit() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let under_a = Sealer::new(Some(a)).seal(&Secret::new("va")).unwrap();
        let under_b = Sealer::new(Some(b)).seal(&Secret::new("vb")).unwrap();
        let under_c = Sealer::new(Some(c)).seal(&Secret::new("vc")).unwrap();
        let rotated = Sealer::with_previous(Some(c), &[a, b]);
        let (v, which) = rotated.open_which(&under_a).unwrap();
        assert_eq!((v.expose(), which), ("va", OpenedWith::Previous(0)));
        let (v, which) = rotated.open_which(&under_b).unwrap();
        assert_eq!((v.expose(), which), ("vb", OpenedWith::Previous(1)));
        let (v, which) = rotated.open_which(&under_c).unwrap();
        assert_eq!((v.expose(), which), ("vc", OpenedWith::Current));
        assert_eq!(rotated.open_which("plain").unwrap().1, OpenedWith::Plain);
        // New writes use the current key only.
        let sealed = rotated.seal(&Secret::new("new")).unwrap();
        assert_eq!(Sealer::new(Some(c)).open(&sealed).unwrap().expose(), "new");
        assert_eq!(
            Sealer::new(Some(a)).open(&sealed).unwrap_err(),
            SealError::Authentication
        );
        // A key that is neither current nor previous does not open.
        assert_eq!(
            Sealer::with_previous(Some(c), &[b])
                .open(&under_a)
                .unwrap_err(),
            SealError::Authentication
        );
        assert_eq!(
            Sealer::with_previous(Some(c), &[b])
                .open(VECTOR)
                .unwrap_err(),
            SealError::Authentication
        );
    }

    #[test]
    fn value_hash_is_keyed_by_the_encryption_key() {
        let v = Secret::new("fc-live-secret-123");
        let a = Sealer::new(Some([1u8; 32]));
        let b = Sealer::new(Some([2u8; 32]));
        let off = Sealer::new(None);
        assert_eq!(a.value_hash(&v), a.value_hash(&v));
        assert_eq!(a.value_hash(&v).len(), 64);
        assert_ne!(a.value_hash(&v), b.value_hash(&v));
        assert_ne!(a.value_hash(&v), off.value_hash(&v));
        assert_ne!(a.value_hash(&v), a.value_hash(&Secret::new("other")));
        // Never the plain, unsalted sha256 of the value.
        assert_ne!(a.value_hash(&v), hex::encode(Sha256::digest(v.expose())));
        assert_ne!(off.value_hash(&v), hex::encode(Sha256::digest(v.expose())));
        // Previous keys open but do not change the hash key.
        let rotated = Sealer::with_previous(Some([2u8; 32]), &[[1u8; 32]]);
        assert_eq!(rotated.value_hash(&v), b.value_hash(&v));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tagged_value_without_a_key_is_a_hard_error() {
        assert_eq!(
            Sealer::new(None).open(VECTOR).unwrap_err(),
            SealError::NoKey
        );
    }
}
