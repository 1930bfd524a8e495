//! A bare WebSocket client for load generation.
//!
//! The load generator shares two cores with the server it measures, so its per-message cost must
//! be far below the server's. This client does the RFC 6455 handshake by hand, reads the socket
//! in large chunks, parses frame headers in place and hands out payloads as zero-copy `Bytes`; it
//! does not validate UTF-8 or decode STOMP. Scenarios look only at what they measure.

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// What arrived.
#[derive(Debug)]
pub enum WsMessage {
    /// A text or binary message.
    Data(Bytes),
    /// The server closed, with its close code if it sent one.
    Closed(Option<u16>),
}

/// One raw WebSocket connection.
#[derive(Debug)]
pub struct RawWs {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Pieces of a fragmented message.
    partial: Option<BytesMut>,
    read_chunk: usize,
}

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
    /// Path and query, e.g. `/ws`.
    pub path: String,
}

impl Endpoint {
    /// Parses `ws://host:port/path`.
    ///
    /// # Errors
    ///
    /// When the URL is not of that form or does not resolve.
    pub async fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let rest = url
            .strip_prefix("ws://")
            .context("only ws:// URLs are supported")?;
        let (authority, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
        let addr = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .context("no address")?;
        Ok(Endpoint {
            addr,
            host: authority.to_owned(),
            path,
        })
    }
}

impl RawWs {
    /// Connects and upgrades, offering `protocol` if given. `read_chunk` is the read buffer size.
    ///
    /// # Errors
    ///
    /// When the connection or the upgrade fails.
    pub async fn connect(
        endpoint: &Endpoint,
        source: Option<IpAddr>,
        protocol: Option<&str>,
        read_chunk: usize,
    ) -> anyhow::Result<RawWs> {
        let socket = if endpoint.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let mut stream = socket
            .connect(endpoint.addr)
            .await
            .with_context(|| format!("connecting to {}", endpoint.addr))?;
        stream.set_nodelay(true)?;
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            endpoint.path, endpoint.host
        );
        if let Some(p) = protocol {
            request.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut rbuf = BytesMut::with_capacity(read_chunk.max(1024));
        let end = loop {
            if let Some(pos) = rbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if rbuf.len() > 16 * 1024 {
                bail!("upgrade response too long");
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                bail!("connection closed during the upgrade");
            }
        };
        let head = rbuf.split_to(end);
        let status = String::from_utf8_lossy(&head);
        if !status.starts_with("HTTP/1.1 101") {
            bail!(
                "upgrade refused: {}",
                status.lines().next().unwrap_or_default()
            );
        }
        Ok(RawWs {
            stream,
            rbuf,
            wbuf: BytesMut::new(),
            partial: None,
            read_chunk: read_chunk.max(1024),
        })
    }

    /// Queues one masked text message; [`RawWs::flush`] sends what is queued.
    pub fn queue_text(&mut self, payload: &[u8]) {
        encode_client_frame(0x1, payload, &mut self.wbuf);
    }

    /// Sends everything queued.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Sends one masked text message.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn send_text(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        self.queue_text(payload);
        self.flush().await
    }

    /// The next message, answering pings on the way.
    ///
    /// # Errors
    ///
    /// On a transport error or a malformed frame.
    pub async fn next(&mut self) -> anyhow::Result<WsMessage> {
        loop {
            while let Some((opcode, fin, payload)) = parse_server_frame(&mut self.rbuf)? {
                match opcode {
                    0x1 | 0x2 if fin => return Ok(WsMessage::Data(payload)),
                    0x1 | 0x2 => self.partial = Some(BytesMut::from(&payload[..])),
                    0x0 => {
                        let mut partial = self
                            .partial
                            .take()
                            .context("continuation without a start")?;
                        partial.extend_from_slice(&payload);
                        if fin {
                            return Ok(WsMessage::Data(partial.freeze()));
                        }
                        self.partial = Some(partial);
                    }
                    0x8 => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        let mut reply = BytesMut::new();
                        encode_client_frame(0x8, &payload[..payload.len().min(2)], &mut reply);
                        let _ = self.stream.write_all(&reply).await;
                        return Ok(WsMessage::Closed(code));
                    }
                    0x9 => {
                        let mut pong = BytesMut::new();
                        encode_client_frame(0xA, &payload, &mut pong);
                        self.stream.write_all(&pong).await?;
                    }
                    _ => {}
                }
            }
            self.rbuf.reserve(self.read_chunk);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Ok(WsMessage::Closed(None)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(WsMessage::Closed(None));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Parses one server frame (unmasked) from the front of `buf`.
fn parse_server_frame(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, bool, Bytes)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (usize::try_from(u64::from_be_bytes(b))?, 10)
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    let mask_len = if masked { 4 } else { 0 };
    if buf.len() < header + mask_len + len {
        return Ok(None);
    }
    if masked {
        bail!("server sent a masked frame");
    }
    buf.advance(header);
    Ok(Some((opcode, fin, buf.split_to(len).freeze())))
}

/// Encodes a masked client frame. The mask is fixed: masking is not security here, and the
/// server unmasks whatever key it is given.
fn encode_client_frame(opcode: u8, payload: &[u8], dst: &mut BytesMut) {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    dst.reserve(payload.len() + 14);
    dst.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => dst.put_u8(0x80 | u8::try_from(n).unwrap_or(0)),
        n if n <= usize::from(u16::MAX) => {
            dst.put_u8(0x80 | 126);
            dst.put_u16(u16::try_from(n).unwrap_or(0));
        }
        n => {
            dst.put_u8(0x80 | 127);
            dst.put_u64(n as u64);
        }
    }
    dst.put_slice(&MASK);
    dst.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_of_every_length_form() {
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let mut buf = BytesMut::new();
            buf.put_u8(0x81);
            if len < 126 {
                buf.put_u8(u8::try_from(len).unwrap());
            } else if len <= 65_535 {
                buf.put_u8(126);
                buf.put_u16(u16::try_from(len).unwrap());
            } else {
                buf.put_u8(127);
                buf.put_u64(len as u64);
            }
            buf.extend(std::iter::repeat_n(b'x', len));
            let whole = buf.clone();
            // Incomplete prefixes wait for more.
            let mut short = BytesMut::from(&whole[..whole.len() - 1]);
            if len > 0 {
                assert!(parse_server_frame(&mut short).unwrap().is_none());
            }
            let (op, fin, payload) = parse_server_frame(&mut buf).unwrap().unwrap();
            assert_eq!((op, fin, payload.len()), (1, true, len));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn client_frames_are_masked() {
        let mut buf = BytesMut::new();
        encode_client_frame(0x1, b"hello", &mut buf);
        assert_eq!(buf[0], 0x81);
        assert_eq!(buf[1], 0x80 | 5);
        let mask = [buf[2], buf[3], buf[4], buf[5]];
        let payload: Vec<u8> = buf[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(payload, b"hello");
    }
}
