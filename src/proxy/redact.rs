//! Removes the pooled key from bytes streamed to the caller (SPEC §8.6: it never reaches the
//! caller), across chunk boundaries: the last `key.len() - 1` bytes wait for the next chunk.

use axum::body::Bytes;

/// What the key is replaced with.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// Whether `haystack` holds `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A streaming replace of one secret.
pub struct Redactor {
    key: Vec<u8>,
    carry: Vec<u8>,
}

impl Redactor {
    pub fn new(key: &str) -> Redactor {
        Redactor {
            key: key.as_bytes().to_vec(),
            carry: Vec::new(),
        }
    }

    /// The next chunk with every whole occurrence replaced; a tail that could begin an
    /// occurrence is held back until the next chunk or `finish`.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.key.is_empty() {
            return Bytes::copy_from_slice(chunk);
        }
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        let n = self.key.len();
        while i + n <= data.len() {
            if data[i..i + n] == self.key[..] {
                out.extend_from_slice(REDACTED);
                i += n;
            } else {
                out.push(data[i]);
                i += 1;
            }
        }
        // Fewer than `n` bytes remain: keep them, they may start an occurrence.
        self.carry = data[i..].to_vec();
        Bytes::from(out)
    }

    /// What is held back, at the end of the body (it cannot hold a whole occurrence).
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.carry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 13 item 5: the key is removed wherever chunk boundaries fall.
    #[test]
    fn the_key_is_removed_across_any_chunk_boundary() {
        let body = b"{\"error\":\"invalid key sk-live-123 (sk-live-123)\"}sk-live-12";
        for split in 0..body.len() {
            for second in split..body.len() {
                let mut r = Redactor::new("sk-live-123");
                let mut out = Vec::new();
                out.extend_from_slice(&r.push(&body[..split]));
                out.extend_from_slice(&r.push(&body[split..second]));
                out.extend_from_slice(&r.push(&body[second..]));
                out.extend_from_slice(&r.finish());
                assert_eq!(
                    out,
                    b"{\"error\":\"invalid key [REDACTED] ([REDACTED])\"}sk-live-12".to_vec()
                );
            }
        }
    }
}
