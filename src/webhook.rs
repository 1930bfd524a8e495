//! `lockstep webhook verify`: checks a received delivery's signature, for receivers' scripts
//! and for trying a receiver out by hand.

use anyhow::Context as _;
use std::io::Read as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The webhook secret (`webhooks.secret`); a comma-separated list tries each.
    #[arg(long, env = "LOCKSTEP_WEBHOOKS_SECRET", hide_env_values = true)]
    secret: String,
    /// The `Lockstep-Signature` header's value (`t=…,v1=…`).
    #[arg(long)]
    signature: String,
    /// The body as received, byte for byte: a file, or `-` for standard input.
    #[arg(long, default_value = "-", value_name = "FILE")]
    body: String,
    /// How old a signature may be.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    tolerance: Duration,
}

/// Prints `valid` and exits 0, or says why not and exits 1.
///
/// # Errors
///
/// When the body cannot be read.
#[allow(clippy::print_stdout, clippy::print_stderr)] // The verdict is the command's output.
pub(crate) fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut body = Vec::new();
    if args.body == "-" {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading the body from standard input")?;
    } else {
        body = std::fs::read(&args.body).with_context(|| format!("reading {}", args.body))?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut last = None;
    for secret in args
        .secret
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match api::webhooks::sign::verify(
            secret.as_bytes(),
            &args.signature,
            &body,
            now,
            args.tolerance,
        ) {
            Ok(()) => {
                println!("valid");
                return Ok(ExitCode::SUCCESS);
            }
            Err(err) => last = Some(err),
        }
    }
    match last {
        Some(err) => eprintln!("lockstep: invalid webhook signature: {err}"),
        None => eprintln!("lockstep: no secret given"),
    }
    Ok(ExitCode::FAILURE)
}
