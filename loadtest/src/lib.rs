//! Lockstep's load generator and measuring tools, and the STOMP client the end-to-end tests
//! share.
//!
//! # Layout
//!
//! - [`client`]: [`client::StompClient`], a small STOMP-over-WebSocket client on `protocol`.

pub mod client;
