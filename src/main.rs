//! The `vyora-router` binary: parses the command line, sets up logging, and runs.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use vyora_router::admin;
use vyora_router::api::RateLimiter;
use vyora_router::cli::{
    AgentsCommand, CallsCommand, Cli, Command, ConfigArg, DeliveriesCommand, EventsCommand,
    PollerCommand,
};
use vyora_router::config::{Config, ConfigSource, LogFormat};
use vyora_router::signature::Secret;
use vyora_router::trigger;

/// Log lines waiting for stdout at most.
const LOG_QUEUE_LINES: usize = 8192;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config, show_urls } => {
            let config = config.load()?;
            if show_urls {
                print!("{}", config.redacted_toml_with_urls());
            } else {
                print!("{}", config.redacted_toml());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(arg) => {
            let config = arg.load()?;
            let _log = init_logging(&config)?;
            runtime()?.block_on(serve(config, arg.source()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Deliveries(DeliveriesCommand::List {
            config,
            sink,
            status,
            call_id,
            limit,
            json,
        }) => {
            let conn = admin::open(&config.store_path()?)?;
            let filter = admin::ListFilter {
                sink,
                status,
                call_id,
                limit,
            };
            let rows = admin::list(&conn, &filter)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{}", admin::render_deliveries(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Deliveries(DeliveriesCommand::Replay {
            config,
            sink,
            which,
            json,
        }) => {
            let conn = admin::open(&config.store_path()?)?;
            let which = match (which.dead, which.call_id, which.id) {
                (_, Some(call), _) => admin::Replay::CallId(call),
                (_, _, Some(id)) => admin::Replay::Id(id),
                _ => admin::Replay::Dead,
            };
            let replayed = admin::replay(&conn, &sink, &which)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "sink": sink, "replayed": replayed })
                );
            } else {
                println!(
                    "{replayed} deliveries to {sink} are pending again; the running server sends them shortly"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(EventsCommand::Show {
            config,
            call_id,
            json,
        }) => {
            let conn = admin::open(&config.store_path()?)?;
            let events = admin::show_events(&conn, &call_id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else if events.is_empty() {
                println!("no stored events for call {call_id}");
            } else {
                println!("{}", admin::render_events(&events));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Calls(CallsCommand::Get { config, call_id }) => {
            let client = api_client(&config)?;
            let record = runtime()?.block_on(client.call(&call_id))?;
            let value: serde_json::Value =
                serde_json::from_slice(&record).context("the answer is not JSON")?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents(AgentsCommand::List {
            config,
            limit,
            offset,
            json,
        }) => {
            let client = api_client(&config)?;
            let list = runtime()?.block_on(client.agents(limit, offset))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{}", admin::render_agents(&list.agents));
                if let Some(total) = list.total {
                    println!("{} of {total} agents", list.agents.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Poller(PollerCommand::Status {
            config,
            limit,
            json,
        }) => {
            let conn = admin::open(&config.store_path()?)?;
            let rows = admin::poll_status(&conn, limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no calls are tracked (is poller.enabled set?)");
            } else {
                println!("{}", admin::render_polls(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trigger {
            event,
            url,
            secret,
            call_id,
        } => {
            let secret = first_secret(&secret)?;
            let call_id = call_id.unwrap_or_else(|| format!("trigger-{:016x}", fastrand::u64(..)));
            vyora_router::net::install_tls_provider();
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .context("cannot set up the HTTP client")?;
            let mut all_ok = true;
            for name in event.events() {
                let body = trigger::payload(name, &call_id);
                let (status, answer) = runtime()?
                    .block_on(trigger::send(&client, &url, &secret, name, body))
                    .with_context(|| format!("sending {name} to {url}"))?;
                // The answer comes from whatever server --url names: never raw to the terminal.
                println!("{name} {call_id} -> {status} {}", admin::printable(&answer));
                all_ok &= (200..300).contains(&status);
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Sign { secret, file } => {
            let secret = first_secret(&secret)?;
            let body = match file {
                Some(path) => std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => {
                    let mut body = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                        .context("cannot read standard input")?;
                    body
                }
            };
            println!("{}", vyora_router::signature::sign(&secret, &body));
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck(arg) => {
            let config = arg.load()?;
            // Probes run beside the router, so they use the operator's listener.
            let addr = loopback_for(config.admin.listen);
            let status = runtime()?
                .block_on(vyora_router::server::check_health(addr))
                .with_context(|| format!("health check of {addr}"))?;
            if status.is_success() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("health check of {addr}: {status}");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// The first secret of a comma-separated list (as `VYORA_WEBHOOK_SECRET` may hold).
fn first_secret(secrets: &str) -> anyhow::Result<Secret> {
    let first = secrets.split(',').map(str::trim).next().unwrap_or_default();
    Secret::new(first.as_bytes()).context("--secret (or VYORA_WEBHOOK_SECRET) is empty")
}

/// The REST client for one command: its own rate limiter, since the command makes a
/// single request.
fn api_client(config: &ConfigArg) -> anyhow::Result<vyora_router::api::Client> {
    let api = config.api()?;
    let limiter = RateLimiter::new(api.requests_per_minute, Duration::from_secs(60));
    Ok(vyora_router::api::Client::new(&api, Arc::new(limiter))?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(config: Config, source: ConfigSource) -> anyhow::Result<()> {
    let listeners = vyora_router::Listeners::bind(&config).await?;
    let reloads = reload_on_sighup(source)?;
    vyora_router::run(config, listeners, shutdown_signal()?, reloads).await?;
    Ok(())
}

/// Re-reads the config on every SIGHUP; a config that does not load is reported and the
/// running one stays.
fn reload_on_sighup(source: ConfigSource) -> anyhow::Result<mpsc::Receiver<Config>> {
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match Config::load(&source) {
                Ok(config) => {
                    tracing::info!("SIGHUP: reloading the config");
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the config is not valid; the running config stays")
                }
            }
        }
    });
    Ok(rx)
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down; a second signal exits at once");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("second signal: exiting now");
            std::process::exit(130);
        });
    })
}

/// `RUST_LOG` overrides `log.level`. Lines go through a background writer so a slow
/// stdout never holds up an acknowledgement.
fn init_logging(config: &Config) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v)
            .with_context(|| format!("RUST_LOG={v:?} is not a valid filter"))?,
        _ => EnvFilter::try_new(&config.log.level)
            .with_context(|| format!("log.level = {:?}", config.log.level))?,
    };
    // The default queue holds 128,000 lines, preallocated (4 MB resident at idle); when
    // stdout cannot keep up, lines beyond these are dropped, never the request blocked.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .finish(std::io::stdout());
    // Colours only for a person at a terminal, never into a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(guard)
}

/// The address to probe for a listen address: an unspecified one is reached on loopback.
fn loopback_for(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}
