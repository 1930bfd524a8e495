//! `lockstep`: the composition root. Parses the command line and configuration, wires the hub
//! and the API together, and runs until a signal asks it to stop.

mod config;
mod secret;
mod serve;
mod token;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit code for invalid configuration or usage (BSD `EX_USAGE`).
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Real-time collaboration hub: STOMP over WebSocket, edit locks, presigned object access"
)]
struct Cli {
    /// TOML configuration file (also LOCKSTEP_CONFIG).
    #[arg(long, global = true, env = "LOCKSTEP_CONFIG")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the WebSocket hub and the HTTP API on one port.
    Serve {
        /// Address to bind (overrides LOCKSTEP_LISTEN and the file).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (overrides LOCKSTEP_DATA_DIR and the file).
        #[arg(long)]
        data_dir: Option<String>,
    },
    /// Run the lock store's database migrations and exit (`serve` also runs them).
    Migrate,
    /// Print a token signed with the configured HS256 secret.
    Token(token::TokenArgs),
    /// Print every configuration key with its environment variable and default.
    Config {
        /// As a Markdown table.
        #[arg(long)]
        markdown: bool,
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
        Command::Config { markdown } => {
            print_keys(*markdown);
            return ExitCode::SUCCESS;
        }
        Command::Token(_) | Command::Migrate => Vec::new(),
    };
    let config = match load_config(cli.config.as_deref(), flags) {
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
        Command::Config { .. } => Ok(()),
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
) -> Result<config::Config, config::ConfigErrors> {
    let mut sources = config::Sources::default();
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(text) => sources.file(path, &text),
            Err(err) => return Err(config::ConfigErrors(vec![format!("{path}: {err}")])),
        }
    }
    sources.env(std::env::vars());
    for (name, value) in flags {
        sources.flag(name, value);
    }
    sources.build()
}

#[allow(clippy::print_stdout)] // The command's output.
fn print_keys(markdown: bool) {
    if markdown {
        print!("{}", config::markdown());
        return;
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
}
