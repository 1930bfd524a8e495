//! Session ids that prove who they were issued to.
//!
//! The `session` header of `CONNECTED` names one WebSocket session. A lock taken with it is
//! released when that session ends, so the lock API must only accept a session that a node of
//! this cluster issued to the caller: otherwise a forged id could bind (or, through its node
//! part, release) locks it has no business with. A session id is therefore
//! `{node}.{id}.{mac}`, where `mac` is an HMAC-SHA256 over the node, the id and the user,
//! keyed with a secret every node shares. Any node checks it without a lookup.
//!
//! The node part is a ULID (26 Crockford base-32 characters), so it can be matched exactly and
//! never carries SQL `LIKE` wildcards or case variants of another node's id.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in a session id (128 bits).
const MAC_BYTES: usize = 16;

/// Why a session id was refused. The messages are safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("not a session id issued by this cluster (use the session header of CONNECTED)")]
    Malformed,
    #[error("the session was not issued to this user")]
    Forged,
}

/// A verified session id's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId<'a> {
    /// The node that hosts (or hosted) the session.
    pub node: &'a str,
    /// The session's own id, unique within the node.
    pub id: &'a str,
}

/// Issues and checks session ids with a shared key.
#[derive(Clone)]
pub struct SessionKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("SessionKey")
    }
}

impl SessionKey {
    /// A key from a secret shared by every node of the cluster.
    pub fn new(secret: &[u8]) -> SessionKey {
        SessionKey {
            // HMAC takes keys of any length.
            mac: HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length"),
        }
    }

    /// A key derived from another secret (the JWT HS256 secret), so that a deployment that
    /// already shares one secret needs no second one. The label keeps the two uses apart.
    pub fn derived_from(secret: &[u8]) -> SessionKey {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
        mac.update(b"lockstep session ids v1");
        SessionKey::new(&mac.finalize().into_bytes())
    }

    fn tag(&self, node: &str, id: &str, user: &str) -> HmacSha256 {
        let mut mac = self.mac.clone();
        // Lengths first, so no two (node, id, user) triples feed the same bytes.
        for part in [node, id, user] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The session id for session `id` of `user` on `node`.
    pub fn issue(&self, node: &str, id: &str, user: &str) -> String {
        let tag = self.tag(node, id, user).finalize().into_bytes();
        format!("{node}.{id}.{}", URL_SAFE_NO_PAD.encode(&tag[..MAC_BYTES]))
    }

    /// Checks that `session` was issued to `user` by a node holding this key.
    ///
    /// # Errors
    ///
    /// [`SessionError::Malformed`] when it is not a session id at all, [`SessionError::Forged`]
    /// when its MAC does not match (another user's session, or made up).
    pub fn verify<'a>(&self, session: &'a str, user: &str) -> Result<SessionId<'a>, SessionError> {
        let mut parts = session.split('.');
        let (Some(node), Some(id), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Malformed);
        };
        if !is_ulid(node) || !is_ulid(id) {
            return Err(SessionError::Malformed);
        }
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| SessionError::Malformed)?;
        if mac.len() != MAC_BYTES {
            return Err(SessionError::Malformed);
        }
        // Constant time: a forger learns nothing from how long the comparison took.
        self.tag(node, id, user)
            .verify_truncated_left(&mac)
            .map_err(|_| SessionError::Forged)?;
        Ok(SessionId { node, id })
    }
}

/// Whether `s` is a ULID as the `ulid` crate prints it: 26 upper-case Crockford base-32
/// characters.
pub fn is_ulid(s: &str) -> bool {
    s.len() == 26
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "01JD0000000000000000000000";
    const ID: &str = "01JD0000000000000000000001";

    #[test]
    fn issued_ids_verify_for_their_user_only() {
        let key = SessionKey::derived_from(b"secret");
        let session = key.issue(NODE, ID, "ana");
        assert!(session.len() <= 128, "{session}");
        assert_eq!(
            key.verify(&session, "ana"),
            Ok(SessionId { node: NODE, id: ID })
        );
        assert_eq!(key.verify(&session, "bob"), Err(SessionError::Forged));
        // Another cluster's key.
        let other = SessionKey::derived_from(b"other");
        assert_eq!(other.verify(&session, "ana"), Err(SessionError::Forged));
    }

    #[test]
    fn forgeries_and_wildcards_are_refused() {
        let key = SessionKey::new(b"k");
        let session = key.issue(NODE, ID, "ana");
        let lower = session.to_lowercase();
        let swapped_node = session.replacen(NODE, "01JD0000000000000000000002", 1);
        let forged = [
            "%.x",
            "_________________________._________________________.x",
            "__________________________.__________________________.AAAAAAAAAAAAAAAAAAAAAA",
            lower.as_str(),
            swapped_node.as_str(),
            "",
            "a.b",
            &format!("{session}.x"),
            &format!("{NODE}.{ID}.!!!!"),
            &format!("{NODE}.{ID}.AAAA"),
        ];
        for s in forged {
            assert!(key.verify(s, "ana").is_err(), "{s} was accepted");
        }
    }

    #[test]
    fn parts_cannot_be_shifted_between_fields() {
        let key = SessionKey::new(b"k");
        // The length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            key.tag("ab", "c", "u").finalize().into_bytes(),
            key.tag("a", "bc", "u").finalize().into_bytes()
        );
    }

    #[test]
    fn ulids() {
        assert!(is_ulid(NODE));
        assert!(is_ulid(&"Z".repeat(26)));
        assert!(!is_ulid(&NODE.to_lowercase()));
        assert!(!is_ulid("01JD000000000000000000000%"));
        assert!(!is_ulid("01JD00000000000000000000I0"));
        assert!(!is_ulid("01JD"));
    }
}
