//! `lockstep healthcheck`: ask a running node whether it is alive or ready.
//!
//! A container image without curl still needs a health check; this is a plain HTTP/1.1 GET over
//! a TCP connection, with a deadline on every step, so a hung node fails the check instead of
//! hanging it.

use crate::config::Config;
use anyhow::{Context as _, bail};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub(crate) struct HealthcheckArgs {
    /// Check readiness (GET /readyz: broker and lock store reachable) instead of liveness.
    #[arg(long)]
    ready: bool,
    /// The node to ask, e.g. `http://127.0.0.1:8080`; default: the configured listen address.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Longest the whole check may take.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// # Errors
///
/// When the node cannot be reached in time or does not answer 200.
#[allow(clippy::print_stdout)] // The command's output.
pub(crate) fn run(config: &Config, args: &HealthcheckArgs) -> anyhow::Result<()> {
    let (host, addrs) = match &args.url {
        Some(url) => parse_url(url)?,
        None => {
            let addr = loopback_for(config.listen);
            (addr.to_string(), vec![addr])
        }
    };
    let path = if args.ready { "/readyz" } else { "/healthz" };
    // `localhost` may resolve to ::1 first while the node listens on 127.0.0.1: try each.
    let mut answer = Err(anyhow::anyhow!("{host} has no address"));
    for addr in addrs {
        answer = get(&host, addr, path, args.timeout);
        if answer.is_ok() {
            break;
        }
    }
    let status = answer.with_context(|| format!("GET http://{host}{path}"))?;
    if status != 200 {
        bail!("GET http://{host}{path} answered {status}");
    }
    println!("GET http://{host}{path}: 200");
    Ok(())
}

/// A node bound to every interface is asked on loopback.
fn loopback_for(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `http://host:port[/…]` → (`host:port`, its resolved addresses).
fn parse_url(url: &str) -> anyhow::Result<(String, Vec<SocketAddr>)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("'{url}' is not an http:// URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    // A port is a last `:` outside IPv6 brackets.
    let has_port = authority.rfind(':').is_some_and(|i| {
        let host = &authority[..i];
        host.ends_with(']') || !host.contains(':')
    });
    let with_port = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "{authority} has no address");
    Ok((authority.to_owned(), addrs))
}

/// The status code of `GET path`.
fn get(host: &str, addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lockstep-healthcheck\r\nConnection: close\r\n\r\n"
    )?;
    // The status line is in the first bytes; the body does not matter.
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..])?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = std::str::from_utf8(&head[..read]).unwrap_or_default();
    line.strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_asked_on_loopback() {
        assert_eq!(
            loopback_for("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            loopback_for("[::]:9000".parse().unwrap()),
            "[::1]:9000".parse().unwrap()
        );
        assert_eq!(
            loopback_for("10.0.0.5:80".parse().unwrap()),
            "10.0.0.5:80".parse().unwrap()
        );
    }

    #[test]
    fn urls_name_host_and_port() {
        let (host, addrs) = parse_url("http://127.0.0.1:9000/whatever").unwrap();
        assert_eq!(host, "127.0.0.1:9000");
        assert_eq!(addrs, vec!["127.0.0.1:9000".parse().unwrap()]);
        let (host, addrs) = parse_url("http://[::1]:81").unwrap();
        assert_eq!(host, "[::1]:81");
        assert_eq!(addrs, vec!["[::1]:81".parse().unwrap()]);
        assert_eq!(parse_url("http://127.0.0.1").unwrap().1[0].port(), 80);
        assert!(parse_url("https://example.com").is_err());
    }
}
