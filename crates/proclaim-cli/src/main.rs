//! The `proclaim` command: `migrate`, `relay`, `emit`, `status`, `replay`,
//! `demo`, `chaos`.
//!
//! Exit codes: 0 success; 1 a runtime failure (database or broker
//! unreachable, missing table, …); 2 bad input (flags, config file, JSON).

mod args;
mod commands;
#[cfg(test)]
mod properties;
mod settings;
mod store;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command, LogFormat};

/// Bad input from the user: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InputError(pub(crate) String);

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = settings::FileConfig::load(cli.global.config.as_deref())
        .map_err(|e| InputError(format!("{e:#}")))?;
    if let Command::Demo(args) = cli.command {
        return commands::demo::run(args).await;
    }
    let store =
        settings::store_settings(&cli.global, &file).map_err(|e| InputError(format!("{e:#}")))?;
    match cli.command {
        Command::Demo(_) => Ok(()),
        Command::Chaos(args) => commands::chaos::run(&store, args).await,
        Command::Migrate => commands::migrate::run(&store).await,
        Command::Relay(args) => commands::relay::run(&store, args, file).await,
        Command::Emit(args) => commands::emit::run(&store, args).await,
        Command::Status(args) => commands::status::run(&store, args).await,
        Command::Replay(args) => commands::replay::run(&store, args).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Relay(_) | Command::Migrate => "info",
        Command::Chaos(_) => "warn,proclaim_chaos=info",
        _ => "warn",
    };
    init_logging(cli.global.log_format, default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.chain().any(|c| c.is::<InputError>() || is_input(c)) {
                2
            } else {
                1
            };
            let _ = writeln!(std::io::stderr(), "error: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

fn is_input(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<proclaim::ConfigError>()
        || matches!(e.downcast_ref::<proclaim::StoreError>(), Some(proclaim::StoreError::Config(msg)) if !msg.contains("proclaim migrate"))
}

/// The error chain on one line, without repeating a cause already quoted.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}
