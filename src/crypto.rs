//! The sealer (SPEC §4): values at rest are plaintext or `enc:gcm:` + hex(nonce ‖ ciphertext ‖ tag),
//! AES-256-GCM without associated data — byte-for-byte the Go service's format.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

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

/// Seals new writes when a key is configured; opens both kinds of stored value.
#[derive(Clone)]
pub struct Sealer {
    cipher: Option<Aes256Gcm>,
}

impl Sealer {
    pub fn new(key: Option<[u8; 32]>) -> Self {
        Sealer {
            cipher: key.map(|k| Aes256Gcm::new(&k.into())),
        }
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
        let Some(hex_body) = stored.strip_prefix(TAG) else {
            return Ok(Secret::new(stored));
        };
        let cipher = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let raw = hex::decode(hex_body).map_err(|_| SealError::Malformed("not hex"))?;
        if raw.len() < NONCE_LEN + GCM_TAG_LEN {
            return Err(SealError::Malformed("too short"));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| SealError::Authentication)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| SealError::Malformed("plaintext is not UTF-8"))
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
    fn tagged_value_without_a_key_is_a_hard_error() {
        assert_eq!(
            Sealer::new(None).open(VECTOR).unwrap_err(),
            SealError::NoKey
        );
    }
}
