//! WebSocket close codes Lockstep uses, with their meaning for a client.
//!
//! Codes 4000–4999 are the application range of RFC 6455. A close frame's payload is at most
//! 125 bytes, two of them the code, so every reason here stays under 123 bytes. A client
//! should reconnect after 4002 (with a fresh token), 4008, 4009 and 4010; 4001, 4003 and 4004
//! mean the same request will fail again.

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

    /// Every code, for documentation and tests.
    pub const ALL: [Disconnect; 8] = [
        Disconnect::NORMAL,
        Disconnect::UNAUTHORIZED,
        Disconnect::TOKEN_EXPIRED,
        Disconnect::PROTOCOL_ERROR,
        Disconnect::FORBIDDEN,
        Disconnect::SLOW_CONSUMER,
        Disconnect::TOO_MANY_CONNECTIONS,
        Disconnect::SHUTTING_DOWN,
    ];

    /// Whether a client should reconnect after this close.
    pub fn should_reconnect(&self) -> bool {
        matches!(self.code, 1000 | 4002 | 4008 | 4009 | 4010)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_a_close_frame() {
        for d in Disconnect::ALL {
            assert!(d.reason.len() < 123, "{d:?}");
            assert!(d.code == 1000 || (4000..5000).contains(&d.code), "{d:?}");
        }
    }
}
