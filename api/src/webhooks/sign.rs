//! The `Lockstep-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`.
//!
//! The timestamp is signed with the body, so a captured delivery cannot be replayed later than
//! the receiver's tolerance, and a body changed in transit fails. Receivers compare in constant
//! time (`hmac`'s `verify_slice`).

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use std::time::Duration;

/// The header a delivery is signed in.
pub const HEADER: &str = "lockstep-signature";

/// How old a signature a receiver accepts by default: deliveries are signed when sent, so a
/// fresh one is seconds old; five minutes leaves room for clock skew.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a delivery's signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the signature header is not `t=<unix seconds>,v1=<hex>`")]
    Malformed,
    #[error("the signature does not match the body (wrong secret, or the body was changed)")]
    Mismatch,
    #[error("the signature is {age}s old; at most {tolerance}s is accepted (a replay?)")]
    TooOld { age: u64, tolerance: u64 },
    #[error("the signature is dated {ahead}s in the future; check the clocks")]
    InTheFuture { ahead: u64 },
}

fn mac(secret: &[u8], t: u64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` signed with `secret` at `t` (Unix seconds).
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    let tag = mac(secret, t, body).finalize().into_bytes();
    let mut hex = String::with_capacity(tag.len() * 2);
    for byte in tag {
        hex.push_str(&format!("{byte:02x}"));
    }
    format!("t={t},v1={hex}")
}

/// Checks a delivery: `header` must sign `body` with `secret`, dated within `tolerance` of
/// `now` (Unix seconds). Several `v1=` entries are allowed (one per secret while a secret is
/// rotated); one match is enough.
///
/// # Errors
///
/// [`VerifyError`] saying what is wrong.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let mut t = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => {
                t = Some(value.parse::<u64>().map_err(|_| VerifyError::Malformed)?);
            }
            Some(("v1", value)) => tags.push(decode_hex(value).ok_or(VerifyError::Malformed)?),
            // Other schemes a later version may add are skipped, as Stripe's receivers do.
            Some(_) => {}
            None => return Err(VerifyError::Malformed),
        }
    }
    let Some(t) = t else {
        return Err(VerifyError::Malformed);
    };
    if tags.is_empty() {
        return Err(VerifyError::Malformed);
    }
    if !tags
        .iter()
        .any(|tag| mac(secret, t, body).verify_slice(tag).is_ok())
    {
        return Err(VerifyError::Mismatch);
    }
    let tolerance = tolerance.as_secs();
    if now > t && now - t > tolerance {
        return Err(VerifyError::TooOld {
            age: now - t,
            tolerance,
        });
    }
    if t > now && t - now > tolerance {
        return Err(VerifyError::InTheFuture { ahead: t - now });
    }
    Ok(())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a webhook secret of some length";
    const BODY: &[u8] = br#"{"id":1,"ts":1,"events":[]}"#;

    #[test]
    fn a_signed_body_verifies() {
        let header = sign(SECRET, 1_700_000_000, BODY);
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        assert_eq!(header.len(), "t=1700000000,v1=".len() + 64);
        assert_eq!(
            verify(SECRET, &header, BODY, 1_700_000_010, DEFAULT_TOLERANCE),
            Ok(())
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_t_dot_body() {
        // Computed independently: `printf '42.body' | openssl dgst -sha256 -hmac key`.
        assert_eq!(
            sign(b"key", 42, b"body"),
            "t=42,v1=b62a8bcafebc3dda9022b563e771f54e72a1eef3fd12e7bd2713899387cc26f8"
        );
    }

    #[test]
    fn tampering_fails() {
        let header = sign(SECRET, 100, BODY);
        let tampered = br#"{"id":2,"ts":1,"events":[]}"#;
        assert_eq!(
            verify(SECRET, &header, tampered, 100, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"another secret", &header, BODY, 100, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        // A timestamp moved forward to dodge the tolerance breaks the tag.
        let moved = header.replace("t=100", "t=400");
        assert_eq!(
            verify(SECRET, &moved, BODY, 400, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn old_and_future_signatures_fail() {
        let header = sign(SECRET, 1000, BODY);
        assert_eq!(
            verify(SECRET, &header, BODY, 1301, DEFAULT_TOLERANCE),
            Err(VerifyError::TooOld {
                age: 301,
                tolerance: 300
            })
        );
        assert_eq!(
            verify(SECRET, &header, BODY, 1300, DEFAULT_TOLERANCE),
            Ok(())
        );
        assert_eq!(
            verify(SECRET, &header, BODY, 600, DEFAULT_TOLERANCE),
            Err(VerifyError::InTheFuture { ahead: 400 })
        );
    }

    #[test]
    fn malformed_headers_fail() {
        for header in [
            "",
            "t=1",
            "v1=00",
            "t=x,v1=00",
            "t=1,v1=0g",
            "t=1,v1=abc",
            "nonsense",
        ] {
            assert_eq!(
                verify(SECRET, header, BODY, 1, DEFAULT_TOLERANCE),
                Err(VerifyError::Malformed),
                "{header}"
            );
        }
    }

    #[test]
    fn any_of_several_tags_may_match() {
        let good = sign(SECRET, 5, BODY);
        let other = sign(b"old secret", 5, BODY);
        let both = format!("{},{}", other, &good["t=5,".len()..]);
        assert_eq!(verify(SECRET, &both, BODY, 5, DEFAULT_TOLERANCE), Ok(()));
    }
}
