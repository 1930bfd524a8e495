//! WebSocket close codes Lockstep uses, with their meaning for a client. The one home of
//! every code the hub sends.
//!
//! Codes 4000–4999 are the application range of RFC 6455; 1000 and 1013 are RFC 6455's own. A
//! close frame's payload is at most 125 bytes, two of them the code, so every reason here stays
//! under 123 bytes. A client should reconnect after 1013 (later), 4002 (with a fresh token),
//! 4008, 4009 and 4010, and after a 4003 heart-beat timeout; 4001, other 4003s, 4004 and 4011
//! mean the same request will fail again (after 4011 only a token issued later is accepted).

/// A close code and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u16,
    pub reason: &'static str,
}

impl Disconnect {
    /// Normal closure after a client's `DISCONNECT`.
    pub const NORMAL: Disconnect = Disconnect {
        code: 1000,
        reason: "bye",
    };
    /// No token, or an invalid one.
    pub const UNAUTHORIZED: Disconnect = Disconnect {
        code: 4001,
        reason: "unauthorized",
    };
    /// The token's `exp` passed while connected; reconnect with a fresh token.
    pub const TOKEN_EXPIRED: Disconnect = Disconnect {
        code: 4002,
        reason: "token expired",
    };
    /// The client broke STOMP: a malformed frame, a frame over a limit, an unknown command.
    pub const PROTOCOL_ERROR: Disconnect = Disconnect {
        code: 4003,
        reason: "protocol error",
    };
    /// A refused subscription or publish.
    pub const FORBIDDEN: Disconnect = Disconnect {
        code: 4004,
        reason: "forbidden",
    };
    /// The client did not read fast enough and its outbound queue filled up.
    pub const SLOW_CONSUMER: Disconnect = Disconnect {
        code: 4008,
        reason: "slow consumer",
    };
    /// The node is at its connection limit; try again or elsewhere.
    pub const TOO_MANY_CONNECTIONS: Disconnect = Disconnect {
        code: 4009,
        reason: "too many connections",
    };
    /// The node is shutting down; reconnect to another node.
    pub const SHUTTING_DOWN: Disconnect = Disconnect {
        code: 4010,
        reason: "server shutting down",
    };
    /// The node was silent long enough for the cluster to take it for dead (it stalled), so the
    /// locks bound to its sessions are being released: reconnect (to any node) and acquire them
    /// again. Same code as a shutdown, because the client does the same thing.
    pub const NODE_EXPIRED: Disconnect = Disconnect {
        code: 4010,
        reason: "node lost its cluster lease; reconnect",
    };
    /// The peer's heart-beats (or any other sign of life) stopped: a dead peer. A protocol
    /// error in STOMP's terms; the client may reconnect.
    pub const HEARTBEAT_TIMEOUT: Disconnect = Disconnect {
        code: 4003,
        reason: "heart-beat timeout",
    };
    /// The platform removed this user's connections (the control API): do not reconnect with
    /// the same token; it is refused from now on.
    pub const REMOVED: Disconnect = Disconnect {
        code: 4011,
        reason: "removed",
    };
    /// The cluster broker is unavailable (RFC 6455 "try again later").
    pub const UNAVAILABLE: Disconnect = Disconnect {
        code: 1013,
        reason: "broker unavailable",
    };

    /// Every close the hub sends, for documentation and tests.
    pub const ALL: [Disconnect; 12] = [
        Disconnect::NORMAL,
        Disconnect::UNAUTHORIZED,
        Disconnect::TOKEN_EXPIRED,
        Disconnect::PROTOCOL_ERROR,
        Disconnect::FORBIDDEN,
        Disconnect::SLOW_CONSUMER,
        Disconnect::TOO_MANY_CONNECTIONS,
        Disconnect::SHUTTING_DOWN,
        Disconnect::NODE_EXPIRED,
        Disconnect::HEARTBEAT_TIMEOUT,
        Disconnect::REMOVED,
        Disconnect::UNAVAILABLE,
    ];

    /// Whether a client should reconnect after this close (with a fresh token after 4002).
    /// `false` means the same request would fail again, or the client asked to leave (1000).
    pub fn should_reconnect(&self) -> bool {
        matches!(self.code, 1013 | 4002 | 4008 | 4009 | 4010) || *self == Self::HEARTBEAT_TIMEOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_a_close_frame() {
        for d in Disconnect::ALL {
            assert!(d.reason.len() < 123, "{d:?}");
            assert!(
                d.code == 1000 || d.code == 1013 || (4000..5000).contains(&d.code),
                "{d:?}"
            );
        }
    }

    #[test]
    fn reconnect_advice() {
        assert!(!Disconnect::NORMAL.should_reconnect());
        assert!(!Disconnect::UNAUTHORIZED.should_reconnect());
        assert!(!Disconnect::PROTOCOL_ERROR.should_reconnect());
        assert!(Disconnect::HEARTBEAT_TIMEOUT.should_reconnect());
        assert!(Disconnect::NODE_EXPIRED.should_reconnect());
        assert!(Disconnect::UNAVAILABLE.should_reconnect());
        assert!(!Disconnect::REMOVED.should_reconnect());
    }
}
