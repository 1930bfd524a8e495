//! A minimal STOMP-over-WebSocket client built on `protocol`, for the load generator and the
//! end-to-end tests. It speaks exactly what it is told to, including malformed input, so tests
//! can probe the server's refusals.

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use protocol::{Command, Decoder, Frame, Limits};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

/// How to open the WebSocket.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// `Sec-WebSocket-Protocol` values to offer; `None` offers `v12.stomp`, an empty list
    /// sends no header.
    pub subprotocols: Option<Vec<String>>,
    /// An `Origin` header, as a browser would send.
    pub origin: Option<String>,
    /// An `Authorization: Bearer` header on the upgrade.
    pub bearer: Option<String>,
    /// Local address to bind before connecting (to spread over 127.0.0.x).
    pub source: Option<IpAddr>,
    /// A small read buffer keeps thousands of idle clients cheap.
    pub read_buffer: Option<usize>,
    /// The socket's kernel receive buffer (`SO_RCVBUF`), to play a slow link: a reader that
    /// does not read then holds back the server within a few frames, not megabytes.
    pub recv_buffer: Option<u32>,
}

/// Something that came from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Frame(Frame),
    /// A heart-beat (a message holding only EOLs).
    HeartBeat,
    /// The server closed the WebSocket with this code and reason (`None` when it closed the
    /// TCP connection without a close frame).
    Closed(Option<(u16, String)>),
}

/// One client connection.
#[derive(Debug)]
pub struct StompClient {
    ws: WebSocketStream<TcpStream>,
    decoder: Decoder,
    buf: BytesMut,
    pending: VecDeque<Frame>,
    /// The negotiated subprotocol, if any.
    pub protocol: Option<String>,
}

impl StompClient {
    /// Opens a WebSocket to `url` (`ws://host:port/ws?...`).
    ///
    /// # Errors
    ///
    /// When the TCP connection or the upgrade fails (an HTTP refusal includes its status).
    pub async fn open(url: &str, options: &OpenOptions) -> anyhow::Result<StompClient> {
        let mut request = url.into_client_request()?;
        let protocols = options
            .subprotocols
            .as_ref()
            .map_or_else(|| "v12.stomp".to_owned(), |p| p.join(", "));
        let headers = request.headers_mut();
        if !protocols.is_empty() {
            headers.insert("sec-websocket-protocol", protocols.parse()?);
        }
        if let Some(origin) = &options.origin {
            headers.insert("origin", origin.parse()?);
        }
        if let Some(token) = &options.bearer {
            headers.insert("authorization", format!("Bearer {token}").parse()?);
        }
        let host = request.uri().host().context("url has no host")?.to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .context("url host does not resolve")?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = options.source {
            socket.bind(SocketAddr::new(source, 0))?;
        }
        if let Some(size) = options.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        let stream = socket
            .connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let config =
            WebSocketConfig::default().read_buffer_size(options.read_buffer.unwrap_or(16 * 1024));
        let (ws, response) = client_async_with_config(request, stream, Some(config))
            .await
            .map_err(|err| match err {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    let body = response
                        .body()
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    anyhow::anyhow!("upgrade refused: HTTP {} {body}", response.status())
                }
                other => anyhow::Error::new(other).context("websocket upgrade failed"),
            })?;
        let protocol = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limits = Limits {
            max_frame_bytes: 16 << 20,
            max_headers: 256,
            max_header_bytes: 64 << 10,
            max_body_bytes: 16 << 20,
        };
        Ok(StompClient {
            ws,
            decoder: Decoder::new(limits),
            buf: BytesMut::new(),
            pending: VecDeque::new(),
            protocol,
        })
    }

    /// Opens and sends `CONNECT` with `token` as passcode; returns the `CONNECTED` frame.
    ///
    /// # Errors
    ///
    /// When the connection fails or the server answers anything but `CONNECTED`.
    pub async fn connect(url: &str, token: &str) -> anyhow::Result<(StompClient, Frame)> {
        Self::connect_with(url, &OpenOptions::default(), token, "0,0").await
    }

    /// Like [`StompClient::connect`], with options and a `heart-beat` header.
    ///
    /// # Errors
    ///
    /// As [`StompClient::connect`].
    pub async fn connect_with(
        url: &str,
        options: &OpenOptions,
        token: &str,
        heart_beat: &str,
    ) -> anyhow::Result<(StompClient, Frame)> {
        let mut client = StompClient::open(url, options).await?;
        let connect = Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("host", "lockstep")
            .with_header("passcode", token)
            .with_header("heart-beat", heart_beat);
        client.send(&connect).await?;
        let frame = client.expect_frame().await?;
        if frame.command != Command::Connected {
            bail!("expected CONNECTED, got {}", describe(&frame));
        }
        Ok((client, frame))
    }

    /// Sends one frame as one text message.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn send(&mut self, frame: &Frame) -> anyhow::Result<()> {
        let text = String::from_utf8(frame.to_bytes().to_vec())
            .context("frame is not UTF-8; use send_raw")?;
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends raw bytes as one binary message (for malformed input).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.ws.send(Message::binary(bytes.to_vec())).await?;
        Ok(())
    }

    /// Sends raw text as one text message.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// The next frame, heart-beat or close from the server.
    ///
    /// # Errors
    ///
    /// When the transport fails or the server sends malformed STOMP.
    pub async fn next(&mut self) -> anyhow::Result<Incoming> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Ok(Incoming::Frame(frame));
            }
            let message = match self.ws.next().await {
                None => return Ok(Incoming::Closed(None)),
                Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => {
                    return Ok(Incoming::Closed(None));
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(p))) => {
                    // A reset without a closing handshake.
                    tracing::debug!(%p, "protocol error while reading");
                    return Ok(Incoming::Closed(None));
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Io(e))) => {
                    tracing::debug!(%e, "io error while reading");
                    return Ok(Incoming::Closed(None));
                }
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(message)) => message,
            };
            let data = match message {
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Binary(b) => b.to_vec(),
                Message::Close(frame) => {
                    // Complete the closing handshake: tungstenite queued the reply.
                    let _ = self.ws.flush().await;
                    return Ok(Incoming::Closed(
                        frame.map(|f: CloseFrame| (f.code.into(), f.reason.to_string())),
                    ));
                }
                _ => continue,
            };
            let only_eols = data.iter().all(|b| matches!(b, b'\n' | b'\r'));
            self.buf.extend_from_slice(&data);
            while let Some(frame) = self.decoder.decode(&mut self.buf)? {
                self.pending.push_back(frame);
            }
            if self.pending.is_empty() && only_eols {
                return Ok(Incoming::HeartBeat);
            }
        }
    }

    /// The next frame, skipping heart-beats.
    ///
    /// # Errors
    ///
    /// When the connection closes first, or after 10 seconds.
    pub async fn expect_frame(&mut self) -> anyhow::Result<Frame> {
        self.expect_frame_within(Duration::from_secs(10)).await
    }

    /// The next frame within `timeout`, skipping heart-beats.
    ///
    /// # Errors
    ///
    /// When the connection closes first, or on timeout.
    pub async fn expect_frame_within(&mut self, timeout: Duration) -> anyhow::Result<Frame> {
        tokio::time::timeout(timeout, async {
            loop {
                match self.next().await? {
                    Incoming::Frame(frame) => return Ok(frame),
                    Incoming::HeartBeat => {}
                    Incoming::Closed(close) => {
                        bail!("connection closed ({close:?}) while waiting for a frame")
                    }
                }
            }
        })
        .await
        .context("timed out waiting for a frame")?
    }

    /// Reads until the server closes; returns the `ERROR` frame seen before the close (if any)
    /// and the close code and reason.
    ///
    /// # Errors
    ///
    /// After 10 seconds without a close, or on a transport error.
    pub async fn expect_close(&mut self) -> anyhow::Result<(Option<Frame>, Option<(u16, String)>)> {
        let mut error = None;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.next().await? {
                    Incoming::Frame(f) if f.command == Command::Error => error = Some(f),
                    Incoming::Frame(_) | Incoming::HeartBeat => {}
                    Incoming::Closed(close) => return Ok::<_, anyhow::Error>(close),
                }
            }
        })
        .await
        .context("timed out waiting for the server to close")?
        .map(|close| (error, close))
    }

    /// `SUBSCRIBE` with a receipt; waits for the `RECEIPT`.
    ///
    /// # Errors
    ///
    /// When the server answers with anything but the receipt.
    pub async fn subscribe(&mut self, id: &str, destination: &str) -> anyhow::Result<()> {
        let receipt = format!("sub-{id}");
        let frame = Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", destination)
            .with_header("receipt", receipt.as_str());
        self.send(&frame).await?;
        self.expect_receipt(&receipt).await
    }

    /// `SUBSCRIBE` with a receipt and extra headers (`x-stream-offset`, …); waits for the
    /// `RECEIPT`, keeping the `MESSAGE`s that come first (a resume's) for later.
    ///
    /// # Errors
    ///
    /// When the server answers with anything but the receipt.
    pub async fn subscribe_with(
        &mut self,
        id: &str,
        destination: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let receipt = format!("sub-{id}");
        let mut frame = Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", destination)
            .with_header("receipt", receipt.as_str());
        for (name, value) in headers {
            frame = frame.with_header(*name, *value);
        }
        self.send(&frame).await?;
        self.expect_receipt(&receipt).await
    }

    /// Waits for `RECEIPT` `receipt-id`, keeping any `MESSAGE` that arrives first for later.
    ///
    /// # Errors
    ///
    /// On `ERROR`, close, or timeout.
    pub async fn expect_receipt(&mut self, receipt_id: &str) -> anyhow::Result<()> {
        let mut held = VecDeque::new();
        let result = loop {
            let frame = match self.expect_frame().await {
                Ok(f) => f,
                Err(e) => break Err(e),
            };
            match frame.command {
                Command::Receipt if frame.header("receipt-id") == Some(receipt_id) => break Ok(()),
                Command::Message => held.push_back(frame),
                _ => {
                    break Err(anyhow::anyhow!(
                        "expected RECEIPT {receipt_id}, got {}",
                        describe(&frame)
                    ));
                }
            }
        };
        // Put held messages back in front, in order.
        while let Some(f) = held.pop_back() {
            self.pending.push_front(f);
        }
        result
    }

    /// `SEND` of a JSON body with an `event-type`, optionally with a receipt it waits for.
    ///
    /// # Errors
    ///
    /// When the write fails or the receipt does not come.
    pub async fn publish(
        &mut self,
        destination: &str,
        event_type: &str,
        body: &str,
        receipt: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut frame = Frame::new(Command::Send)
            .with_header("destination", destination)
            .with_header("event-type", event_type)
            .with_header("content-type", "application/json")
            .with_header("content-length", body.len().to_string())
            .with_body(body.to_owned());
        if let Some(r) = receipt {
            frame = frame.with_header("receipt", r);
        }
        self.send(&frame).await?;
        if let Some(r) = receipt {
            self.expect_receipt(r).await?;
        }
        Ok(())
    }

    /// Closes the WebSocket.
    ///
    /// # Errors
    ///
    /// When the close cannot be sent.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.ws.close(None).await?;
        Ok(())
    }

    /// The raw WebSocket, for tests that must stop reading.
    pub fn into_inner(self) -> WebSocketStream<TcpStream> {
        self.ws
    }

    /// The raw WebSocket, for tests that read messages exactly as they came.
    pub fn ws_mut(&mut self) -> &mut WebSocketStream<TcpStream> {
        &mut self.ws
    }
}

/// A short description of a frame for error messages.
pub fn describe(frame: &Frame) -> String {
    match frame.command {
        Command::Error => format!(
            "ERROR message={:?} body={:?}",
            frame.header("message").unwrap_or_default(),
            String::from_utf8_lossy(&frame.body)
        ),
        _ => format!("{} {:?}", frame.command, frame.headers),
    }
}
