//! STOMP heart-beat negotiation (STOMP 1.2, "Heart-beating").

/// A `heart-beat` header: `send_ms` is how often the sender can send, `recv_ms` how often it
/// wants to receive. Zero means "cannot" / "does not want".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeartBeat {
    pub send_ms: u32,
    pub recv_ms: u32,
}

impl HeartBeat {
    pub const NONE: HeartBeat = HeartBeat {
        send_ms: 0,
        recv_ms: 0,
    };

    /// Parses `cx,cy`.
    pub fn parse(value: &str) -> Option<HeartBeat> {
        let (send, recv) = value.split_once(',')?;
        Some(HeartBeat {
            send_ms: send.trim().parse().ok()?,
            recv_ms: recv.trim().parse().ok()?,
        })
    }

    /// The header value, `cx,cy`.
    pub fn header_value(&self) -> String {
        format!("{},{}", self.send_ms, self.recv_ms)
    }

    /// Negotiates with a client. `self` is what the server offers.
    ///
    /// Returns `(server_sends_every_ms, client_sends_every_ms)`, each `None` when that direction
    /// has no heart-beats. Per the spec, each direction uses the larger of what the sender can do
    /// and what the receiver wants, and is off if either side says zero.
    pub fn negotiate(&self, client: HeartBeat) -> (Option<u32>, Option<u32>) {
        let pick = |can: u32, want: u32| (can != 0 && want != 0).then(|| can.max(want));
        (
            pick(self.send_ms, client.recv_ms),
            pick(client.send_ms, self.recv_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_spec() {
        let server = HeartBeat {
            send_ms: 10_000,
            recv_ms: 10_000,
        };
        let client = HeartBeat {
            send_ms: 4_000,
            recv_ms: 20_000,
        };
        assert_eq!(server.negotiate(client), (Some(20_000), Some(10_000)));
        assert_eq!(server.negotiate(HeartBeat::NONE), (None, None));
        let server_off = HeartBeat {
            send_ms: 0,
            recv_ms: 5_000,
        };
        assert_eq!(server_off.negotiate(client), (None, Some(5_000)));
        assert_eq!(
            HeartBeat::parse("0, 5"),
            Some(HeartBeat {
                send_ms: 0,
                recv_ms: 5
            })
        );
        assert_eq!(HeartBeat::parse("5"), None);
        assert_eq!(HeartBeat::parse("-1,5"), None);
    }
}
