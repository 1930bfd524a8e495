//! `lockstep token`: mint a token for development and service accounts.

use crate::config::Config;
use anyhow::Context as _;
use jsonwebtoken::{EncodingKey, Header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// A team the user belongs to (repeat for several).
    #[arg(long = "team")]
    teams: Vec<String>,
    /// A team the user administers (repeat for several; implies membership).
    #[arg(long = "admin-of")]
    admin_of: Vec<String>,
    /// Scopes: publish, publish:global, locks, presign (repeat, or space-separate).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Lifetime, e.g. 1h, 30m, 90d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// # Errors
///
/// When no HS256 secret can be found or created, or a scope is unknown.
#[allow(clippy::print_stdout)] // The token is the command's output.
pub(crate) fn run(config: &Config, args: &TokenArgs) -> anyhow::Result<()> {
    let secret = match &config.jwt.secret {
        Some(secret) => secret.clone(),
        None if config.jwt.public_keys.is_some() => {
            anyhow::bail!(
                "tokens are verified with public keys here; mint them with your identity provider, or configure jwt.secret"
            )
        }
        None => crate::secret::load_or_create(&config.data_dir)?,
    };
    let scope: Vec<&str> = args
        .scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .collect();
    for s in &scope {
        anyhow::ensure!(
            protocol::Scope::parse(s).is_some(),
            "unknown scope '{s}': use publish, publish:global, locks or presign"
        );
    }
    let mut teams = args.teams.clone();
    for team in &args.admin_of {
        if !teams.contains(team) {
            teams.push(team.clone());
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let mut claims = serde_json::json!({
        "sub": args.sub,
        "teams": teams,
        "admin_of": args.admin_of,
        "scope": scope.join(" "),
        "iat": now,
        "exp": now + args.ttl.as_secs(),
    });
    if let Some(iss) = &config.jwt.issuer {
        claims["iss"] = iss.clone().into();
    }
    if let Some(aud) = &config.jwt.audience {
        claims["aud"] = aud.clone().into();
    }
    let token = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?;
    println!("{token}");
    Ok(())
}
