//! The servers `loadtest` can measure, and how each one is spoken to.
//!
//! - Lockstep: STOMP 1.2 with JWT passcodes it mints from the node's HS256 secret; topics are
//!   `/team/t{i}`, `/user/u{i}` or `/global`.
//! - RabbitMQ Web-STOMP: STOMP with guest/guest; topics are `/topic/…`.
//! - The ceiling server (`loadtest ceiling-server`): a bare WebSocket broadcaster; a client
//!   sends `sub {topic}` (answered `ok`), a publisher sends `pub {topic}\n{payload}`.

use crate::wire::{Endpoint, RawWs, WsMessage};
use anyhow::{Context as _, bail};
use jsonwebtoken::{EncodingKey, Header};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Which kind of topic subscribers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicKind {
    /// `/team/t{i}`: subscribers spread over `--topics` teams.
    Team,
    /// `/user/u{i}`: one topic per subscriber.
    User,
    /// `/global`: one topic for everyone.
    Global,
}

/// A server under test. Each holds one or more endpoints (the nodes of a cluster); client `i`
/// connects to endpoint `i % len`.
#[derive(Debug, Clone)]
pub enum Target {
    Lockstep {
        ws: Vec<Endpoint>,
        secret: String,
    },
    Rabbit {
        ws: Vec<Endpoint>,
        login: String,
        passcode: String,
    },
    Ceiling {
        ws: Vec<Endpoint>,
    },
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Lockstep { .. } => "lockstep",
            Target::Rabbit { .. } => "rabbitmq-web-stomp",
            Target::Ceiling { .. } => "ceiling",
        }
    }

    fn endpoint(&self, index: usize) -> &Endpoint {
        match self {
            Target::Lockstep { ws, .. } | Target::Rabbit { ws, .. } | Target::Ceiling { ws } => {
                &ws[index % ws.len()]
            }
        }
    }

    /// The destination of topic `index` of `kind`.
    pub fn destination(&self, kind: TopicKind, index: usize) -> String {
        let name = match kind {
            TopicKind::Team => format!("t{index}"),
            TopicKind::User => format!("u{index}"),
            TopicKind::Global => "global".to_owned(),
        };
        match (self, kind) {
            (Target::Lockstep { .. }, TopicKind::Team) => format!("/team/{name}"),
            (Target::Lockstep { .. }, TopicKind::User) => format!("/user/{name}"),
            (Target::Lockstep { .. }, TopicKind::Global) => "/global".to_owned(),
            (Target::Rabbit { .. }, _) => format!("/topic/{name}"),
            (Target::Ceiling { .. }, _) => name,
        }
    }

    /// Opens a connection as client `index` (a member of teams `t{i}` for `i` in `teams`), past
    /// `CONNECT`.
    ///
    /// # Errors
    ///
    /// When the connection fails or the server refuses it.
    pub async fn open(
        &self,
        index: usize,
        teams: &[usize],
        source: Option<IpAddr>,
        heart_beat_ms: u32,
        read_chunk: usize,
    ) -> anyhow::Result<RawWs> {
        let protocol = match self {
            Target::Ceiling { .. } => None,
            _ => Some("v12.stomp"),
        };
        let mut ws = RawWs::connect(self.endpoint(index), source, protocol, read_chunk).await?;
        let login = match self {
            Target::Ceiling { .. } => return Ok(ws),
            Target::Lockstep { secret, .. } => {
                format!("passcode:{}\n", token(secret, &format!("u{index}"), teams)?)
            }
            Target::Rabbit {
                login, passcode, ..
            } => format!("login:{login}\npasscode:{passcode}\n"),
        };
        let connect = format!(
            "CONNECT\naccept-version:1.2\nhost:/\nheart-beat:{heart_beat_ms},{heart_beat_ms}\n{login}\n\0"
        );
        ws.send_text(connect.as_bytes()).await?;
        let reply = next_frame(&mut ws).await?;
        if !reply.starts_with(b"CONNECTED") {
            bail!("CONNECT refused: {}", String::from_utf8_lossy(&reply));
        }
        Ok(ws)
    }

    /// Subscribes an open connection to `destination` and waits until the server confirms.
    ///
    /// # Errors
    ///
    /// When the server refuses or closes.
    pub async fn subscribe(
        &self,
        ws: &mut RawWs,
        id: usize,
        destination: &str,
    ) -> anyhow::Result<()> {
        let (frame, answer): (String, &[u8]) = match self {
            Target::Ceiling { .. } => (format!("sub {destination}"), b"ok"),
            _ => (
                format!(
                    "SUBSCRIBE\nid:{id}\ndestination:{destination}\nack:auto\nreceipt:r{id}\n\n\0"
                ),
                b"RECEIPT",
            ),
        };
        ws.send_text(frame.as_bytes()).await?;
        let mut reply = next_frame(ws).await?;
        // An event of an earlier subscription (a presence change of a team subscribed just
        // before, say) may come first.
        while answer == b"RECEIPT" && reply.starts_with(b"MESSAGE") {
            reply = next_frame(ws).await?;
        }
        if !reply.starts_with(answer) {
            bail!(
                "SUBSCRIBE {destination} refused: {}",
                String::from_utf8_lossy(&reply)
            );
        }
        Ok(())
    }

    /// Queues one publish of `body` (JSON) to `destination` on `ws`.
    pub fn queue_publish(&self, ws: &mut RawWs, destination: &str, body: &str, key: Option<&str>) {
        match self {
            Target::Ceiling { .. } => {
                ws.queue_text(format!("pub {destination}\n{body}").as_bytes());
            }
            _ => {
                // An id needs no escaping; a keyed event keeps its key's latest (DESIGN §13).
                let key = key.map(|k| format!("x-key:{k}\n")).unwrap_or_default();
                ws.queue_text(
                    format!(
                        "SEND\ndestination:{destination}\nevent-type:load.test\n{key}content-type:application/json\ncontent-length:{}\n\n{body}\0",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        }
    }

    /// Whether a received message is an event (as opposed to a heart-beat or a receipt).
    pub fn is_event(&self, message: &[u8]) -> bool {
        match self {
            Target::Ceiling { .. } => message.first() == Some(&b'{'),
            _ => message.starts_with(b"MESSAGE"),
        }
    }
}

/// Waits for the next non-heart-beat message, up to 30 seconds.
async fn next_frame(ws: &mut RawWs) -> anyhow::Result<bytes::Bytes> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await? {
                WsMessage::Data(d) if d.iter().all(|b| matches!(b, b'\n' | b'\r')) => {}
                WsMessage::Data(d) => return Ok(d),
                WsMessage::Closed(code) => bail!("closed by the server ({code:?})"),
            }
        }
    })
    .await
    .context("no answer within 30 s")?
}

/// A token for `sub`, member of teams `t{i}` for `i` in `teams`, with `scope`.
///
/// # Errors
///
/// When signing fails.
pub fn token_with_scope(
    secret: &str,
    sub: &str,
    teams: &[usize],
    scope: &str,
) -> anyhow::Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    let teams: Vec<String> = teams.iter().map(|i| format!("t{i}")).collect();
    let claims = serde_json::json!({"sub": sub, "teams": teams, "scope": scope, "exp": exp});
    Ok(jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// A Lockstep token for `sub`, member of teams `t{i}` for `i` in `teams`, allowed to publish
/// anywhere.
///
/// # Errors
///
/// When signing fails.
pub fn token(secret: &str, sub: &str, teams: &[usize]) -> anyhow::Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    let teams: Vec<String> = teams.iter().map(|i| format!("t{i}")).collect();
    let claims = serde_json::json!({"sub": sub, "teams": teams, "scope": "publish publish:global", "exp": exp});
    Ok(jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}
