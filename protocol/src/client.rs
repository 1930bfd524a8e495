//! The typed view of frames a client sends.
//!
//! [`ClientFrame::try_from`] checks the headers each command needs and turns the untyped
//! [`Frame`] into a [`ClientCommand`]. Commands the hub does not serve (server commands sent by
//! a client, typos) become [`ClientCommand::Unknown`], so the session can name them in its
//! `ERROR` frame.

use crate::frame::{Command, Frame};
use crate::heartbeat::HeartBeat;
use crate::stream::{self, StreamError, StreamStart};
use bytes::Bytes;
use thiserror::Error;

/// A frame from a client, with the `receipt` header every command may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    pub command: ClientCommand,
    pub receipt: Option<String>,
}

/// The `SUBSCRIBE` header that opts a subscription out of presence events.
pub const PRESENCE_HEADER: &str = "x-presence";

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCommand {
    /// `CONNECT` or `STOMP`.
    Connect(Connect),
    Subscribe {
        id: String,
        destination: String,
        ack: Option<String>,
        /// Where the subscription starts (`x-stream-offset`, `x-stream-epoch`); `None`: live
        /// only, and no `lockstep.subscribed` frame.
        stream: Option<StreamStart>,
        /// `x-presence:false`: the subscription does not want the topic's `presence.*`
        /// events (DESIGN §14); its user still counts as present.
        presence: bool,
    },
    Unsubscribe {
        id: String,
    },
    Send {
        destination: String,
        /// The `event-type` header: the envelope's `type`.
        event_type: Option<String>,
        /// The `x-key` header: the event's key in its topic.
        key: Option<String>,
        content_type: Option<String>,
        /// A bearer token in `passcode` or `Authorization: Bearer …`: what a token refresh
        /// (`SEND` to `/lockstep/token`) carries.
        token: Option<String>,
        body: Bytes,
    },
    Ack {
        id: String,
    },
    Nack {
        id: String,
    },
    /// `BEGIN`, `COMMIT` or `ABORT`: parsed so the hub can refuse them by name.
    Transaction {
        command: Command,
    },
    Disconnect,
    /// A command a client may not send: a server command or an unknown one.
    Unknown {
        command: String,
    },
}

/// The `CONNECT`/`STOMP` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Versions from `accept-version`; empty means the client speaks only 1.0.
    pub accept_version: Vec<String>,
    pub host: Option<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// The `Authorization` header, if a client puts its bearer token there.
    pub authorization: Option<String>,
    pub heart_beat: HeartBeat,
}

impl Connect {
    /// The bearer token this frame carries: `passcode`, else `Authorization: Bearer …`.
    pub fn token(&self) -> Option<&str> {
        bearer(self.passcode.as_deref(), self.authorization.as_deref())
    }

    /// The highest version both sides speak, if any.
    pub fn negotiate_version(&self) -> Option<&'static str> {
        if self.accept_version.is_empty() {
            return Some("1.0");
        }
        ["1.2", "1.1", "1.0"]
            .into_iter()
            .find(|v| self.accept_version.iter().any(|a| a == v))
    }
}

/// The token a frame carries: `passcode`, else `Authorization: Bearer …`.
fn bearer<'a>(passcode: Option<&'a str>, authorization: Option<&'a str>) -> Option<&'a str> {
    let from_passcode = passcode.filter(|p| !p.is_empty());
    let from_header = authorization.and_then(|h| {
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim)
    });
    from_passcode.or(from_header)
}

/// A frame that names a known command but lacks what that command needs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    #[error("{command} frame is missing the '{header}' header")]
    MissingHeader {
        command: &'static str,
        header: &'static str,
    },
    #[error("invalid heart-beat header '{0}'")]
    InvalidHeartBeat(String),
    #[error("invalid x-presence header '{0}': use true or false")]
    InvalidPresence(String),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl TryFrom<Frame> for ClientFrame {
    type Error = CommandError;

    fn try_from(frame: Frame) -> Result<ClientFrame, CommandError> {
        let receipt = frame.header("receipt").map(str::to_owned);
        let need = |command: &'static str, header: &'static str| {
            frame
                .header(header)
                .map(str::to_owned)
                .ok_or(CommandError::MissingHeader { command, header })
        };
        let command = match &frame.command {
            Command::Connect | Command::Stomp => {
                let heart_beat = match frame.header("heart-beat") {
                    Some(value) => HeartBeat::parse(value)
                        .ok_or_else(|| CommandError::InvalidHeartBeat(value.to_owned()))?,
                    None => HeartBeat::NONE,
                };
                ClientCommand::Connect(Connect {
                    accept_version: frame
                        .header("accept-version")
                        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
                        .unwrap_or_default(),
                    host: frame.header("host").map(str::to_owned),
                    login: frame.header("login").map(str::to_owned),
                    passcode: frame.header("passcode").map(str::to_owned),
                    authorization: frame
                        .header("Authorization")
                        .or_else(|| frame.header("authorization"))
                        .map(str::to_owned),
                    heart_beat,
                })
            }
            Command::Subscribe => ClientCommand::Subscribe {
                destination: need("SUBSCRIBE", "destination")?,
                // STOMP 1.0 made `id` optional; 1.1 and 1.2 require it. Without one the client
                // could not tell its subscriptions apart, so it is required here.
                id: need("SUBSCRIBE", "id")?,
                ack: frame.header("ack").map(str::to_owned),
                stream: StreamStart::parse(
                    frame.header(stream::OFFSET_HEADER),
                    frame.header(stream::EPOCH_HEADER),
                )?,
                presence: match frame.header(PRESENCE_HEADER) {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(other) => return Err(CommandError::InvalidPresence(other.to_owned())),
                },
            },
            Command::Unsubscribe => ClientCommand::Unsubscribe {
                id: need("UNSUBSCRIBE", "id")?,
            },
            Command::Send => ClientCommand::Send {
                destination: need("SEND", "destination")?,
                event_type: frame.header("event-type").map(str::to_owned),
                key: frame.header(crate::server::KEY_HEADER).map(str::to_owned),
                content_type: frame.header("content-type").map(str::to_owned),
                token: bearer(frame.header("passcode"), frame.header("authorization"))
                    .map(str::to_owned),
                body: frame.body.clone(),
            },
            Command::Ack => ClientCommand::Ack {
                id: need("ACK", "id")?,
            },
            Command::Nack => ClientCommand::Nack {
                id: need("NACK", "id")?,
            },
            Command::Begin | Command::Commit | Command::Abort => ClientCommand::Transaction {
                command: frame.command.clone(),
            },
            Command::Disconnect => ClientCommand::Disconnect,
            Command::Connected
            | Command::Message
            | Command::Receipt
            | Command::Error
            | Command::Unknown(_) => ClientCommand::Unknown {
                command: frame.command.as_str().to_owned(),
            },
        };
        Ok(ClientFrame { command, receipt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(frame: Frame) -> Result<ClientFrame, CommandError> {
        ClientFrame::try_from(frame)
    }

    #[test]
    fn connect_token_sources() {
        let frame = Frame::new(Command::Connect)
            .with_header("accept-version", "1.1,1.2")
            .with_header("passcode", "tok")
            .with_header("heart-beat", "1000,2000");
        let ClientCommand::Connect(c) = parse(frame).unwrap().command else {
            panic!()
        };
        assert_eq!(c.token(), Some("tok"));
        assert_eq!(c.negotiate_version(), Some("1.2"));
        assert_eq!(
            c.heart_beat,
            HeartBeat {
                send_ms: 1000,
                recv_ms: 2000
            }
        );

        let frame = Frame::new(Command::Stomp).with_header("Authorization", "Bearer abc");
        let ClientCommand::Connect(c) = parse(frame).unwrap().command else {
            panic!()
        };
        assert_eq!(c.token(), Some("abc"));
        assert_eq!(c.negotiate_version(), Some("1.0"));

        let frame = Frame::new(Command::Connect).with_header("accept-version", "2.0");
        let ClientCommand::Connect(c) = parse(frame).unwrap().command else {
            panic!()
        };
        assert_eq!(c.negotiate_version(), None);
    }

    #[test]
    fn missing_headers_are_named() {
        let err = parse(Frame::new(Command::Subscribe).with_header("id", "0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SUBSCRIBE frame is missing the 'destination' header"
        );
        let err = parse(Frame::new(Command::Connect).with_header("heart-beat", "x,1")).unwrap_err();
        assert_eq!(err, CommandError::InvalidHeartBeat("x,1".to_owned()));
    }

    #[test]
    fn x_presence_opts_a_subscription_out_of_presence_events() {
        let subscribe = |presence: Option<&str>| {
            let mut frame = Frame::new(Command::Subscribe)
                .with_header("id", "0")
                .with_header("destination", "/team/t1");
            if let Some(p) = presence {
                frame = frame.with_header(PRESENCE_HEADER, p);
            }
            parse(frame).map(|f| match f.command {
                ClientCommand::Subscribe { presence, .. } => presence,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(subscribe(None), Ok(true));
        assert_eq!(subscribe(Some("true")), Ok(true));
        assert_eq!(subscribe(Some("false")), Ok(false));
        assert_eq!(
            subscribe(Some("no")),
            Err(CommandError::InvalidPresence("no".to_owned()))
        );
    }

    #[test]
    fn server_commands_from_a_client_are_unknown() {
        let f = parse(Frame::new(Command::Message).with_header("receipt", "r1")).unwrap();
        assert_eq!(
            f.command,
            ClientCommand::Unknown {
                command: "MESSAGE".to_owned()
            }
        );
        assert_eq!(f.receipt.as_deref(), Some("r1"));
    }
}
