//! `lockstep`: the composition root. Parses the command line and configuration, wires the hub
//! and the API together, and runs until a signal asks it to stop.

mod config;
mod console;
mod health;
mod secret;
mod serve;
mod token;
mod webhook;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit code for invalid configuration or usage (BSD `EX_USAGE`).
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Real-time collaboration hub: STOMP over WebSocket, edit locks, presigned object access",
    long_about = "Real-time collaboration hub for data-annotation platforms: browsers speak STOMP 1.2 \
over one WebSocket (GET /ws), backends publish events over HTTP (/api/v1), and the API grants \
per-item edit locks and presigned object-storage URLs.\n\n\
Configuration comes from a TOML file (--config) and LOCKSTEP_* environment variables; the \
environment wins. `lockstep config` lists every key.",
    after_help = "Examples:\n  \
lockstep serve                                   one node on its embedded defaults\n  \
lockstep token --sub ana --team t1 --scope locks a development token for that node\n  \
lockstep config check lockstep.toml              validate a configuration without starting\n  \
LOCKSTEP_REDIS_URL=redis://127.0.0.1:6379 LOCKSTEP_DATABASE_URL=postgres://localhost/lockstep \\\n    \
lockstep serve --listen 0.0.0.0:8080           a cluster node"
)]
struct Cli {
    /// TOML configuration file (also LOCKSTEP_CONFIG). Keys are those `lockstep config` lists.
    #[arg(long, global = true, env = "LOCKSTEP_CONFIG", value_name = "FILE")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the WebSocket hub and the HTTP API on one port.
    #[command(
        long_about = "Run a node: the WebSocket hub (GET /ws) and the HTTP API (/api/v1, /healthz, \
/readyz, /metrics) on one port.\n\n\
Without configuration it runs on embedded defaults: an in-process broker, a SQLite lock store and \
a generated JWT secret in the data directory, and no object storage. SIGTERM or SIGINT starts a \
graceful shutdown (clients get close code 4010, in-flight requests finish) bounded by \
shutdown_grace. Invalid configuration is reported in full before anything binds (exit 64)."
    )]
    Serve {
        /// Address to bind (overrides LOCKSTEP_LISTEN and the file).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Data directory (overrides LOCKSTEP_DATA_DIR and the file).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<String>,
    },
    /// Run the lock store's database migrations and exit (`serve` also runs them).
    Migrate,
    /// Print a token signed with the configured HS256 secret.
    #[command(
        long_about = "Print a JWT signed with the configured HS256 secret (jwt.secret, or the secret \
generated into the data directory), for development and for service accounts such as bots and \
backends. Deployments that verify RS256/ES256 tokens mint them with their identity provider."
    )]
    Token(token::TokenArgs),
    /// List the configuration keys, or check a configuration file.
    #[command(args_conflicts_with_subcommands = true)]
    Config {
        #[command(subcommand)]
        action: Option<ConfigAction>,
        /// Print the key list as a Markdown table (as in the README).
        #[arg(long)]
        markdown: bool,
    },
    /// Exit 0 when a node answers /healthz (or /readyz) with 200: for container health checks.
    #[command(
        long_about = "Ask a running node whether it is alive (GET /healthz) or ready (GET /readyz, \
--ready) and exit 0 when it answers 200, 1 otherwise. Meant for container health checks in \
images without curl. The address is --url, or the configured listen address (an unspecified \
address such as 0.0.0.0 is asked on loopback)."
    )]
    Healthcheck(health::HealthcheckArgs),
    /// Tools for webhook receivers.
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
}

#[derive(Debug, Subcommand)]
enum WebhookAction {
    /// Check a delivery's `Lockstep-Signature` against its body and the secret.
    #[command(
        long_about = "Check that a webhook delivery is Lockstep's and unchanged: the Lockstep-Signature header (t=<unix seconds>,v1=<hex HMAC-SHA256 of \"t.body\">) must sign the body with the secret, and be at most --tolerance old. Prints `valid` and exits 0, or says what is wrong and exits 1.",
        after_help = "Example:\n  lockstep webhook verify --secret \"$SECRET\" --signature \"$HEADER\" --body body.json"
    )]
    Verify(webhook::VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print every key with its environment variable, default and meaning (the default action).
    Keys {
        /// As a Markdown table.
        #[arg(long)]
        markdown: bool,
    },
    /// Validate FILE, with the LOCKSTEP_* environment as `serve` would see it, without starting.
    #[command(
        long_about = "Validate a configuration as `lockstep serve` would, without binding or \
connecting to anything: FILE plus the LOCKSTEP_* environment variables (unless --ignore-env). \
Every problem is reported, then the command exits 64; a valid configuration prints a summary \
and exits 0."
    )]
    Check {
        /// The TOML file to check.
        file: String,
        /// Check the file alone, ignoring LOCKSTEP_* variables in the environment.
        #[arg(long)]
        ignore_env: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = match &cli.command {
        Command::Serve { listen, data_dir } => {
            let mut flags = Vec::new();
            if let Some(l) = listen {
                flags.push(("listen", l.clone()));
            }
            if let Some(d) = data_dir {
                flags.push(("data_dir", d.clone()));
            }
            flags
        }
        Command::Config { action, markdown } => {
            return match action {
                None => print_keys(*markdown),
                Some(ConfigAction::Keys { markdown }) => print_keys(*markdown),
                Some(ConfigAction::Check { file, ignore_env }) => check_config(file, *ignore_env),
            };
        }
        Command::Webhook {
            action: WebhookAction::Verify(args),
        } => {
            // Needs no configuration: a receiver runs it with the secret alone.
            return match webhook::verify(args) {
                Ok(code) => code,
                Err(err) => {
                    eprintln!("lockstep: {err:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Token(_) | Command::Migrate | Command::Healthcheck(_) => Vec::new(),
    };
    let config = match load_config(cli.config.as_deref(), flags, true) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("lockstep: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = match cli.command {
        Command::Serve { .. } => serve::run(config),
        Command::Token(args) => token::run(&config, &args),
        Command::Migrate => serve::migrate(&config),
        Command::Healthcheck(args) => health::run(&config, &args),
        Command::Config { .. } | Command::Webhook { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lockstep: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(
    file: Option<&str>,
    flags: Vec<(&'static str, String)>,
    with_env: bool,
) -> Result<config::Config, config::ConfigErrors> {
    let mut sources = config::Sources::default();
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(text) => sources.file(path, &text),
            Err(err) => return Err(config::ConfigErrors(vec![format!("{path}: {err}")])),
        }
    }
    if with_env {
        sources.env(std::env::vars());
    }
    for (name, value) in flags {
        sources.flag(name, value);
    }
    sources.build()
}

#[allow(clippy::print_stdout)] // The command's output.
fn print_keys(markdown: bool) -> ExitCode {
    if markdown {
        print!("{}", config::markdown());
        return ExitCode::SUCCESS;
    }
    for key in config::KEYS {
        println!(
            "{} / {} (default: {:?})\n    {}",
            key.name,
            key.env(),
            key.default,
            key.doc
        );
    }
    ExitCode::SUCCESS
}

/// `lockstep config check FILE`.
#[allow(clippy::print_stdout)] // The command's output.
fn check_config(file: &str, ignore_env: bool) -> ExitCode {
    let checked = load_config(Some(file), Vec::new(), !ignore_env)
        .map_err(|errors| errors.0)
        .and_then(|config| serve::preflight(&config).map(|()| config));
    match checked {
        Ok(config) => {
            let from = if ignore_env {
                ""
            } else {
                " (with the LOCKSTEP_* environment)"
            };
            println!("{file}: valid{from}");
            print!("{}", config.summary());
            for warning in config.warnings() {
                println!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{file}: {} problem(s)", errors.len());
            for error in errors {
                eprintln!("  - {error}");
            }
            ExitCode::from(EX_USAGE)
        }
    }
}
