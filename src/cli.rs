//! The command line: subcommands and their arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, ConfigSource};

#[derive(Debug, Parser)]
#[command(
    name = "vyora-router",
    version,
    about = "Receives Vyora call webhooks, stores them durably and routes them to sinks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive webhooks and deliver them to the configured sinks.
    Serve(ConfigArg),
    /// Validate the config and print the effective settings, secrets redacted.
    CheckConfig(ConfigArg),
    /// Exit 0 if the router configured here answers its health check (for containers).
    Healthcheck(ConfigArg),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML config file [default: config/router.toml, else the built-in default]
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn load(&self) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::load(&ConfigSource::resolve(self.config.clone()))
    }
}
