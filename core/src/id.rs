//! Identifiers: time-ordered, random-suffixed, URL-safe.

use rand::Rng;

/// A 26-hex-digit identifier: 12 digits of milliseconds then 14 random ones, so IDs
/// sort by creation time and collide with negligible probability.
pub fn new_id() -> String {
    let ms = crate::now_ms() & 0xffff_ffff_ffff;
    let r: u64 = rand::rng().random::<u64>() & 0x00ff_ffff_ffff_ffff;
    format!("{ms:012x}{r:014x}")
}

/// A random secret, hex-encoded (32 bytes of entropy).
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

/// The secret that signs the callbacks of `tenant`'s tasks: HMAC-SHA256 of the
/// operator's callback secret over `ferry-callback/{tenant}`, hex. A tenant is given
/// its own and cannot work out another's (nor the operator's), so a receiver that
/// checks the signature knows the callback is about its own tenant's task. Nothing is
/// stored: rotating the operator's secret rotates every tenant's.
pub fn tenant_callback_secret(operator_secret: &str, tenant: &str) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(operator_secret.as_bytes()) else {
        // HMAC takes keys of any length: this branch cannot run.
        return String::new();
    };
    mac.update(b"ferry-callback/");
    mac.update(tenant.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Function names: lowercase letters, digits and `-`, starting with a letter, at most 63.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A hex sha256 digest as Ferry writes it (64 lowercase hex digits).
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Compares secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// sha256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_callback_secrets_are_distinct_and_stable() {
        let a = tenant_callback_secret("op", "acme");
        assert_eq!(a, tenant_callback_secret("op", "acme"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, tenant_callback_secret("op", "bravo"));
        assert_ne!(a, tenant_callback_secret("other", "acme"));
        assert_ne!(a, "op");
    }

    #[test]
    fn ids_sort_by_time_and_differ() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        assert_eq!(a.len(), 26);
        assert!(a < b);
    }

    #[test]
    fn names() {
        assert!(valid_name("hello"));
        assert!(valid_name("transcode-h265"));
        assert!(!valid_name(""));
        assert!(!valid_name("Hello"));
        assert!(!valid_name("9lives"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn sha() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(valid_sha256(&h));
        assert!(!valid_sha256("../etc/passwd"));
    }
}
