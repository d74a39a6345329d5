//! The command line: subcommands and their arguments.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, ConfigSource, PostgresConfig, StoreConfig};
use crate::store::operator::DeliveryStatus;
use crate::trigger::Trigger;

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
    ///
    /// Every error of the file is listed. URL queries and the paths of HTTP sink URLs are
    /// redacted too, as hook URLs often carry their key there (Slack's /services/...,
    /// ?code=).
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Show URLs in full, but for their passwords.
        #[arg(long)]
        show_urls: bool,
        /// Also open the store and connect to each sink (broker login, HTTP host, file
        /// directory), reporting each; exit non-zero if one fails. Nothing is sent.
        #[arg(long)]
        connect: bool,
    },
    /// Exit 0 if the router configured here answers its health check (for containers).
    Healthcheck(ConfigArg),
    /// Inspect deliveries and send them again (works while the server runs).
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Inspect stored events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Stream a running router's events as they are stored and deliveries as they
    /// settle (names and outcomes, no payload), until interrupted. Reads the console's
    /// live stream on the admin listener (with admin.token when set).
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// Only events routed to this sink, and deliveries to it.
        #[arg(long)]
        sink: Option<String>,
        /// Only this event.
        #[arg(long)]
        event: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Vyora calls, from the REST API.
    #[command(subcommand)]
    Calls(CallsCommand),
    /// Vyora agents, from the REST API.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// The missed-analysis poller.
    #[command(subcommand)]
    Poller(PollerCommand),
    /// The store itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Send realistic, correctly signed test events (`call`: the whole lifecycle).
    Trigger {
        event: Trigger,
        /// The router's config: the URL and the secret are taken from it
        /// (server.listen, server.webhook_path, webhook.secrets)
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Where to send [default: from --config, else http://127.0.0.1:8080/webhook]
        #[arg(long)]
        url: Option<String>,
        /// The signing secret [default: the first of --config's webhook secrets, else of
        /// VYORA_WEBHOOK_SECRET]. Prefer the environment variable: a secret given here is
        /// visible to other local users in `ps`
        #[arg(long)]
        secret: Option<String>,
        /// [default: a new random id]
        #[arg(long)]
        call_id: Option<String>,
    },
    /// Print `sha256=<hex>` for a body (standard input when no file is given).
    Sign {
        /// The signing secret [default: the first of VYORA_WEBHOOK_SECRET]. Prefer the
        /// environment variable: a secret given here is visible to other local users in `ps`
        #[arg(long, env = "VYORA_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallsCommand {
    /// Print a call's record (GET /v1/calls/:call_id) as pretty JSON.
    Get {
        #[command(flatten)]
        config: ConfigArg,
        call_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// The workspace's agents (GET /v1/agents).
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        offset: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a SQLite store into PostgreSQL (events, deliveries as they are, poll
    /// schedule, quarantine); stop the router that writes the SQLite file first. Safe to
    /// run again: what is already there is skipped.
    Migrate {
        /// Where `store.url` and `store.schema` are read (`--to` aside).
        #[command(flatten)]
        config: ConfigArg,
        /// The SQLite database (`store.path` of the sidecar).
        #[arg(long, value_name = "PATH")]
        from: PathBuf,
        /// The PostgreSQL URL [default: the config's store.url, which defaults to
        /// DATABASE_URL]. Prefer those: a URL given here is visible to other local users in
        /// `ps`
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PollerCommand {
    /// The calls being tracked, when each is next polled, and why.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value_t = 50, value_parser = crate::store::operator::parse_page_size)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        sink: Option<String>,
        #[arg(long, value_enum)]
        status: Option<Status>,
        #[arg(long)]
        call_id: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = crate::store::operator::parse_page_size)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put deliveries of a sink back to pending, attempts reset; the server delivers them.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        sink: String,
        #[command(flatten)]
        which: ReplayWhich,
        /// With --dead or --status: only deliveries of events received at or after this
        /// (an RFC 3339 time, or a duration ago: "2h").
        #[arg(long, value_parser = crate::store::operator::parse_time, conflicts_with_all = ["call_id", "id"])]
        since: Option<SystemTime>,
        /// With --dead or --status: only deliveries of events received before this.
        #[arg(long, value_parser = crate::store::operator::parse_time, conflicts_with_all = ["call_id", "id"])]
        until: Option<SystemTime>,
        #[arg(long)]
        json: bool,
    },
    /// Give a sink the stored events its route takes and it never had (a sink added
    /// after them, or a filter widened); the running server delivers them. Run twice,
    /// the second run adds nothing.
    Backfill {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        sink: String,
        /// Events received at or after: an RFC 3339 time, or a duration ago ("2d").
        #[arg(long, value_parser = crate::store::operator::parse_time)]
        since: SystemTime,
        /// Events received before this.
        #[arg(long, value_parser = crate::store::operator::parse_time)]
        until: Option<SystemTime>,
        /// Only this event.
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplayWhich {
    /// Every dead delivery of the sink (`--status dead`).
    #[arg(long)]
    pub dead: bool,
    /// Every delivery of the sink in this status: dead, or delivered (to send again).
    #[arg(long, value_enum)]
    pub status: Option<ReplayStatus>,
    /// Every delivery of this call to the sink.
    #[arg(long)]
    pub call_id: Option<String>,
    /// One delivery, by id.
    #[arg(long)]
    pub id: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Stored events, newest first, with their delivery status per sink.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Received at or after: an RFC 3339 time, or a duration ago ("2h", "30m").
        #[arg(long, value_parser = crate::store::operator::parse_time)]
        since: Option<SystemTime>,
        /// Received before: an RFC 3339 time, or a duration ago.
        #[arg(long, value_parser = crate::store::operator::parse_time)]
        until: Option<SystemTime>,
        /// Only this event (call_started, call_completed, all_processing_completed).
        #[arg(long)]
        event: Option<String>,
        /// Only events routed to this sink.
        #[arg(long)]
        sink: Option<String>,
        /// Only events with a delivery in this status (to --sink, if given).
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// The next page: events stored before this id (a list ends saying which).
        #[arg(long, value_name = "ID")]
        before: Option<i64>,
        #[arg(long, default_value_t = 50, value_parser = crate::store::operator::parse_page_size)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// The stored events of a call, their delivery status per sink, and each delivery's
    /// attempts.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        call_id: String,
        /// Show each event's payload, pretty-printed, with personal data masked.
        #[arg(long)]
        payload: bool,
        /// With --payload: show the payload whole, personal data included.
        #[arg(long, requires = "payload")]
        reveal: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML config file [default: config/router.toml, else the built-in default]
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn source(&self) -> ConfigSource {
        ConfigSource::resolve(self.config.clone())
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.source())
    }

    /// The names of the configured sinks, for the commands that take one.
    pub fn sink_names(&self) -> Result<Vec<String>, ConfigError> {
        Config::sink_names(&self.source())
    }

    /// The `[api]` settings, for the `calls` and `agents` commands.
    pub fn api(&self) -> Result<crate::api::ApiConfig, ConfigError> {
        Config::api(&self.source())
    }

    /// The `[store]` settings, for commands that need nothing else (and so no secret).
    pub fn store(&self) -> Result<StoreConfig, ConfigError> {
        Config::store(&self.source())
    }

    /// The PostgreSQL database `store migrate` copies into: `to`, else `store.url`, else
    /// `DATABASE_URL`; `None` if none is set.
    pub fn postgres_target(&self, to: Option<&str>) -> Result<Option<PostgresConfig>, ConfigError> {
        Config::postgres_target(&self.source(), to)
    }
}

/// The statuses a replay can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayStatus {
    Dead,
    Delivered,
}

impl From<ReplayStatus> for DeliveryStatus {
    fn from(s: ReplayStatus) -> DeliveryStatus {
        match s {
            ReplayStatus::Dead => DeliveryStatus::Dead,
            ReplayStatus::Delivered => DeliveryStatus::Delivered,
        }
    }
}

/// A delivery status on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Status {
    Pending,
    Delivered,
    Dead,
}

impl From<Status> for DeliveryStatus {
    fn from(s: Status) -> DeliveryStatus {
        match s {
            Status::Pending => DeliveryStatus::Pending,
            Status::Delivered => DeliveryStatus::Delivered,
            Status::Dead => DeliveryStatus::Dead,
        }
    }
}
