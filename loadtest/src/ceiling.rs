//! `loadtest ceiling-server`: the reference for what this machine can fan out today.
//!
//! A minimal WebSocket broadcaster on tokio-tungstenite with none of Lockstep's work: no STOMP,
//! no auth, no envelope. It keeps what any good broadcaster does: each payload is wrapped once
//! and shared by every receiver, queues are bounded, and each socket's writes are coalesced
//! (feed everything queued, flush once). Lockstep's figures are reported as a fraction of its.
//!
//! Protocol: `sub {topic}` subscribes (answered `ok`); `pub {topic}\n{payload}` broadcasts the
//! payload to the topic's subscribers.

use futures_util::{SinkExt as _, StreamExt as _};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Subscribers = Vec<(u64, mpsc::Sender<Utf8Bytes>)>;

#[derive(Debug, Default)]
struct Topics {
    /// Held only while looking up or fanning out; never across an `.await`.
    map: Mutex<HashMap<String, Subscribers>>,
    next_id: AtomicU64,
}

/// Serves until the process is killed.
///
/// # Errors
///
/// When accepting fails.
pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let topics = Arc::new(Topics::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, topics.clone()));
    }
}

async fn connection(stream: TcpStream, topics: Arc<Topics>) {
    // The same buffer sizes Lockstep uses by default, so memory figures compare.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(64 * 1024);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let id = topics.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(1024);
    let mut subscribed: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            message = ws.next() => {
                let Some(Ok(Message::Text(text))) = message else {
                    if matches!(message, Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_)))) {
                        continue;
                    }
                    break;
                };
                if let Some(topic) = text.as_str().strip_prefix("sub ") {
                    topics.map.lock().entry(topic.to_owned()).or_default().push((id, tx.clone()));
                    subscribed.push(topic.to_owned());
                    if ws.send(Message::text("ok")).await.is_err() {
                        break;
                    }
                } else if let Some(rest) = text.as_str().strip_prefix("pub ") {
                    let Some((topic, payload)) = rest.split_once('\n') else { continue };
                    // Wrapped once; every subscriber gets a reference to the same bytes.
                    let payload = Utf8Bytes::from(payload.to_owned());
                    let mut map = topics.map.lock();
                    if let Some(subs) = map.get_mut(topic) {
                        // A full queue drops that subscriber, as a slow consumer.
                        subs.retain(|(_, s)| s.try_send(payload.clone()).is_ok());
                    }
                }
            }
            Some(first) = rx.recv() => {
                let write = async {
                    ws.feed(Message::Text(first)).await?;
                    for _ in 1..256 {
                        match rx.try_recv() {
                            Ok(next) => ws.feed(Message::Text(next)).await?,
                            Err(_) => break,
                        }
                    }
                    ws.flush().await
                };
                if write.await.is_err() {
                    break;
                }
            }
        }
    }
    let mut map = topics.map.lock();
    for topic in subscribed {
        if let Some(subs) = map.get_mut(&topic) {
            subs.retain(|(sid, _)| *sid != id);
            if subs.is_empty() {
                map.remove(&topic);
            }
        }
    }
}
