//! The `vyora-router` binary: parses the command line, sets up logging, and runs.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use vyora_router::api::RateLimiter;
use vyora_router::cli::{
    AgentsCommand, CallsCommand, Cli, Command, ConfigArg, DeliveriesCommand, EventsCommand,
    PollerCommand, StoreCommand,
};
use vyora_router::config::{
    Config, ConfigSource, LogFormat, PostgresConfig, SECRET_ENV, StoreBackend, StoreConfig,
};
use vyora_router::render;
use vyora_router::server::{HealthError, check_health};
use vyora_router::signature::Secret;
use vyora_router::store::operator::{
    BackfillFrom, DeliveryStatus, EventFilter, ListFilter, REPLAY_MAX, Replay, SinkPause,
};
use vyora_router::store::{Store, StoreError};
use vyora_router::tail::{TailFilter, Tailed};
use vyora_router::trigger::{self, Trigger};

/// Log lines waiting for stdout at most.
const LOG_QUEUE_LINES: usize = 8192;
/// Log bytes gathered into one write to stdout, at most.
const LOG_WRITE_BYTES: usize = 64 * 1024;
/// How long `healthcheck` waits for `/healthz`: less than the image's HEALTHCHECK
/// timeout (3 s), so that it prints why rather than being killed.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Where `trigger` sends without `--url` or `--config`: the default `server.listen`.
const DEFAULT_TRIGGER_URL: &str = "http://127.0.0.1:8080/webhook";

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

/// Hands each command to its own function.
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(arg) => serve(&arg),
        Command::CheckConfig {
            config,
            show_urls,
            connect,
        } => check_config(&config, show_urls, connect),
        Command::Healthcheck(arg) => healthcheck(&arg),
        Command::Deliveries(DeliveriesCommand::List {
            config,
            sink,
            status,
            call_id,
            limit,
            json,
        }) => {
            let filter = ListFilter {
                sink,
                status: status.map(Into::into),
                call_id,
                limit,
            };
            deliveries_list(&config, &filter, json)
        }
        Command::Deliveries(DeliveriesCommand::Replay {
            config,
            sink,
            which,
            since,
            until,
            json,
        }) => {
            let which = match (which.status, which.call_id, which.id) {
                (_, Some(call), _) => Replay::CallId(call),
                (_, _, Some(id)) => Replay::Id(id),
                (status, ..) => Replay::Status {
                    status: status.map_or(DeliveryStatus::Dead, Into::into),
                    since,
                    until,
                },
            };
            deliveries_replay(&config, &sink, &which, json)
        }
        Command::Deliveries(DeliveriesCommand::Backfill {
            config,
            sink,
            since,
            until,
            event,
            json,
        }) => {
            let from = BackfillFrom {
                since: Some(since),
                until,
                event,
                ..BackfillFrom::default()
            };
            deliveries_backfill(&config, &sink, from, json)
        }
        Command::Events(EventsCommand::List {
            config,
            since,
            until,
            event,
            sink,
            status,
            before,
            limit,
            json,
        }) => {
            let filter = EventFilter {
                before,
                since,
                until,
                event,
                sink,
                status: status.map(Into::into),
                limit,
            };
            events_list(&config, &filter, json)
        }
        Command::Events(EventsCommand::Show {
            config,
            call_id,
            payload,
            reveal,
            json,
        }) => {
            let payload = match (payload, reveal) {
                (false, _) => render::Payload::Hidden,
                (true, false) => render::Payload::Masked,
                (true, true) => render::Payload::Revealed,
            };
            events_show(&config, &call_id, payload, json)
        }
        Command::Tail {
            config,
            sink,
            event,
            json,
        } => tail(&config, &TailFilter { sink, event }, json),
        Command::Calls(CallsCommand::Get { config, call_id }) => calls_get(&config, &call_id),
        Command::Agents(AgentsCommand::List {
            config,
            limit,
            offset,
            json,
        }) => agents_list(&config, limit, offset, json),
        Command::Poller(PollerCommand::Status {
            config,
            limit,
            json,
        }) => poller_status(&config, limit, json),
        Command::Trigger {
            event,
            config,
            url,
            secret,
            call_id,
        } => trigger(event, config, url, secret, call_id),
        Command::Sign { secret, file } => sign(&secret, file.as_deref()),
        Command::Store(StoreCommand::Migrate {
            config,
            from,
            to,
            json,
        }) => store_migrate(&config, &from, to.as_deref(), json),
    }
}

/// `serve`: the router itself, until SIGTERM or SIGINT.
fn serve(arg: &ConfigArg) -> anyhow::Result<ExitCode> {
    let config = arg.load()?;
    let _log = init_logging(&config)?;
    let source = match arg.source() {
        ConfigSource::File(path) => path.display().to_string(),
        ConfigSource::Embedded => "the built-in default".to_owned(),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %source,
        store = %Store::location(&config.store),
        "starting"
    );
    runtime()?.block_on(serve_until_signalled(config, arg.source()))?;
    Ok(ExitCode::SUCCESS)
}

/// `check-config`: the effective settings, secrets (and URLs unless asked) redacted; with
/// `--connect`, the store and every sink reached, one line each.
fn check_config(arg: &ConfigArg, show_urls: bool, connect: bool) -> anyhow::Result<ExitCode> {
    let config = arg.load()?;
    let source = arg.source();
    println!("# The effective settings of {source}: every default filled in, secrets redacted.");
    println!();
    if show_urls {
        print!("{}", config.redacted_toml_with_urls());
    } else {
        print!("{}", config.redacted_toml());
    }
    println!();
    println!("# {source} is valid.");
    if !connect {
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    let checks = runtime()?.block_on(connect_all(&config));
    let failed = checks
        .iter()
        .filter(|(_, outcome)| outcome.is_err())
        .count();
    for (what, outcome) in &checks {
        match outcome {
            Ok(found) => println!("ok      {what}: {}", render::printable(found)),
            Err(why) => println!("FAILED  {what}: {}", render::printable(why)),
        }
    }
    if failed == 0 {
        println!("# all {} checks passed.", checks.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("# {failed} of {} checks failed.", checks.len());
        Ok(ExitCode::FAILURE)
    }
}

/// The store and each sink, reached as `serve` would reach them, at once; each outcome
/// says what was found or why not, never a secret.
async fn connect_all(config: &Config) -> Vec<(String, Result<String, String>)> {
    /// A check that hangs is a failed check, not a hung command.
    const LIMIT: Duration = Duration::from_secs(30);
    let within = async |check: vyora_router::sinks::BoxFuture<'_, Result<String, String>>| {
        tokio::time::timeout(LIMIT, check)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {LIMIT:?}")))
    };
    let store = within(Box::pin(check_store(&config.store)));
    let sinks = futures_util::future::join_all(
        config
            .sinks
            .iter()
            .map(|sink| within(sink.kind.probe().probe())),
    );
    let (store, sinks) = tokio::join!(store, sinks);
    let backend = match config.store.backend {
        StoreBackend::Sqlite => "sqlite",
        StoreBackend::Postgres(_) => "postgres",
    };
    std::iter::once((format!("store ({backend})"), store))
        .chain(config.sinks.iter().zip(sinks).map(|(sink, outcome)| {
            (
                format!("sink {} ({})", sink.name, sink.kind.name()),
                outcome,
            )
        }))
        .collect()
}

/// Opens the store as the operator commands do, changing nothing; what `serve` would
/// create or migrate at start is fine (a SQLite file not there yet if its directory is
/// writable, a database without the router's tables, or with those of an older build).
async fn check_store(config: &StoreConfig) -> Result<String, String> {
    if config.backend == StoreBackend::Sqlite && !config.path.exists() {
        return vyora_router::sinks::file::writable(&config.path);
    }
    let store = match Store::open_existing(config).await {
        Ok(store) => store,
        Err(e @ StoreError::NoSchema { .. }) => return Ok(format!("connected; {e}")),
        Err(e @ StoreError::SchemaMismatch { found, current, .. })
            if usize::try_from(found).is_ok_and(|found| found < current) =>
        {
            return Ok(format!("connected; {e}"));
        }
        Err(e) => return Err(e.to_string()),
    };
    store.close().await;
    Ok(match config.backend {
        StoreBackend::Sqlite => format!("{} opened", config.path.display()),
        StoreBackend::Postgres(_) => "connected; the schema is current".to_owned(),
    })
}

/// `healthcheck`: the container's probe of `/healthz` on the admin listener (no curl
/// needed in the image). A failure says why: the container runtime keeps the output.
fn healthcheck(arg: &ConfigArg) -> anyhow::Result<ExitCode> {
    let config = arg.load()?;
    // Probes run beside the router, so they use the operator's listener.
    let addr = vyora_router::net::loopback_for(config.admin.listen);
    let answer = runtime()?
        .block_on(async { tokio::time::timeout(HEALTHCHECK_TIMEOUT, check_health(addr)).await });
    let why = match answer {
        Ok(Ok(status)) if status.is_success() => return Ok(ExitCode::SUCCESS),
        Ok(Ok(status)) => format!("{addr} answered {status}"),
        Ok(Err(HealthError::Connect(e))) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!(
                "connection refused by {addr}: nothing listens there (is the router running, with this admin.listen?)"
            )
        }
        Ok(Err(e)) => format!("{addr}: {e}"),
        Err(_) => format!(
            "no answer from {addr} within {}",
            humantime::format_duration(HEALTHCHECK_TIMEOUT)
        ),
    };
    eprintln!("health check failed: {why}");
    Ok(ExitCode::FAILURE)
}

/// Runs an operator command against the store `arg` names, closing it afterwards so
/// that a write (a replay) is committed before the process exits.
fn with_store<T>(
    arg: &ConfigArg,
    command: impl AsyncFnOnce(&Store) -> Result<T, StoreError>,
) -> anyhow::Result<T> {
    let config = arg.store()?;
    runtime()?.block_on(async {
        let store = Store::open_existing(&config).await?;
        let result = command(&store).await;
        store.close().await;
        Ok(result?)
    })
}

/// `deliveries list`: deliveries, newest first.
fn deliveries_list(arg: &ConfigArg, filter: &ListFilter, json: bool) -> anyhow::Result<ExitCode> {
    let rows = with_store(arg, async |store| {
        let mut rows = store.list_deliveries(filter).await?;
        SinkPause::mark(&store.pauses().await?, &mut rows);
        Ok::<_, StoreError>(rows)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{}", render::deliveries(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `deliveries replay`: chosen deliveries of a sink back to pending; the running server
/// sends them. A sink that neither the config nor the store knows, and a delivery or a
/// call the sink does not have, are errors: a typo must not read as "nothing to do".
fn deliveries_replay(
    arg: &ConfigArg,
    sink: &str,
    which: &Replay,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let configured = arg.sink_names()?;
    let done = with_store(arg, async |store| store.replay(sink, which).await)?;
    if let Some(stored) = &done.other_sinks
        && !configured.iter().any(|name| name == sink)
    {
        let known: BTreeSet<&str> = configured
            .iter()
            .chain(stored)
            .map(String::as_str)
            .collect();
        let known = if known.is_empty() {
            "none".to_owned()
        } else {
            known.into_iter().collect::<Vec<_>>().join(", ")
        };
        anyhow::bail!(
            "sink {} is in neither the config nor the store (known sinks: {})",
            render::printable(sink),
            render::printable(&known)
        );
    }
    if done.matched() == 0 {
        let sink = render::printable(sink);
        match which {
            Replay::Id(id) => anyhow::bail!(
                "sink {sink} has no delivery {id} (`deliveries list --sink {sink}` shows the ids)"
            ),
            Replay::CallId(call) => anyhow::bail!(
                "sink {sink} has no delivery of call {}",
                render::printable(call)
            ),
            Replay::Status { .. } => {}
        }
    }
    if done.too_many {
        anyhow::bail!(
            "more than {REPLAY_MAX} {} to {}: nothing was replayed; choose a shorter time range with --since and --until",
            render::printable(&which.describe()),
            render::printable(sink)
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "sink": sink,
                "replayed": done.replayed,
                "already_pending": done.already_pending,
                "payload_gone": done.payload_gone,
            })
        );
    } else {
        println!("{}", render::replayed(sink, which, &done));
    }
    Ok(ExitCode::SUCCESS)
}

/// `events show`: a call's stored events and their delivery status per sink; a call
/// with none is an error.
fn events_show(
    arg: &ConfigArg,
    call_id: &str,
    payload: render::Payload,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let events = with_store(arg, async |store| store.show_events(call_id).await)?;
    if events.is_empty() {
        anyhow::bail!("no stored events for call {}", render::printable(call_id));
    }
    if json {
        let mut shown = serde_json::to_value(&events)?;
        if payload != render::Payload::Hidden
            && let Some(list) = shown.as_array_mut()
        {
            for (value, event) in list.iter_mut().zip(&events) {
                if let Some(object) = value.as_object_mut() {
                    object.insert("payload".into(), payload.json(&event.payload));
                }
            }
        }
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", render::events(&events));
    if payload != render::Payload::Hidden {
        for event in &events {
            println!("\n{}", render::payload_heading(&event.event, payload));
            println!("{}", render::payload(&payload.json(&event.payload)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `deliveries backfill`: a sink given the stored events its route takes and it never
/// had. The sink must be in the config: its route decides.
fn deliveries_backfill(
    arg: &ConfigArg,
    sink: &str,
    from: BackfillFrom,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Some(route) = Config::route(&arg.source(), sink)? else {
        anyhow::bail!(
            "no sink named {} in {} (configured: {})",
            render::printable(sink),
            arg.source(),
            arg.sink_names()?.join(", ")
        );
    };
    let done = with_store(arg, async |store| {
        vyora_router::backfill::backfill(store, &route, from).await
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!("{}", render::backfilled(sink, &done));
    }
    Ok(ExitCode::SUCCESS)
}

/// `tail`: the running router's happenings, one line each, until interrupted or the
/// router stops (an error: the stream was expected to go on).
fn tail(arg: &ConfigArg, filter: &TailFilter, json: bool) -> anyhow::Result<ExitCode> {
    let admin = Config::admin(&arg.source())?;
    runtime()?.block_on(vyora_router::tail::tail(
        &admin,
        filter,
        |tailed| match tailed {
            Tailed::Happened(h) if json => {
                println!("{}", serde_json::to_string(&h).unwrap_or_default());
            }
            Tailed::Happened(h) => println!("{}", h.line()),
            Tailed::Missed(n) => eprintln!("({n} not shown: this reader fell behind, or the router sampled its feed under load)"),
        },
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `events list`: stored events, newest first, a page at a time. A sink that neither the
/// config names nor any listed event was routed to is an error: a typo must not read as
/// "no events".
fn events_list(arg: &ConfigArg, filter: &EventFilter, json: bool) -> anyhow::Result<ExitCode> {
    let page = with_store(arg, async |store| store.list_events(filter).await)?;
    if let Some(sink) = &filter.sink
        && page.events.is_empty()
        && page.next_before.is_none()
    {
        let configured = arg.sink_names()?;
        if !configured.iter().any(|name| name == sink) {
            anyhow::bail!(
                "no sink named {} in the config or the listed events (configured: {})",
                render::printable(sink),
                configured.join(", ")
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&page)?);
    } else {
        println!("{}", render::event_page(&page));
    }
    Ok(ExitCode::SUCCESS)
}

/// `poller status`: the calls being tracked and when each is polled next.
fn poller_status(arg: &ConfigArg, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let rows = with_store(arg, async |store| store.poll_status(limit).await)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("no calls are tracked (is poller.enabled set?)");
    } else {
        println!("{}", render::polls(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `store migrate`: a SQLite store copied into PostgreSQL, into the schema the config
/// names.
fn store_migrate(
    arg: &ConfigArg,
    from: &std::path::Path,
    to: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(url) = to {
        // Refused here, not as `store.url`, which the user did not write.
        PostgresConfig::from_url(url).map_err(|e| anyhow::anyhow!("--to {e}"))?;
    }
    let Some(mut to) = arg.postgres_target(to)? else {
        anyhow::bail!(
            "no PostgreSQL database to copy into: give --to URL, set store.url in the config (--config PATH), or set DATABASE_URL"
        );
    };
    to.pool_size = 2;
    let migrated = runtime()?
        .block_on(vyora_router::store::migrate_sqlite_to_postgres(from, &to))
        .with_context(|| format!("copying {} into PostgreSQL", from.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&migrated)?);
    } else {
        println!(
            "copied {} events ({} were there already) with {} pending, {} delivered and {} dead deliveries ({} kept attempts), {} tracked calls and {} quarantined bodies",
            migrated.events,
            migrated.skipped,
            migrated.pending,
            migrated.delivered,
            migrated.dead,
            migrated.attempts,
            migrated.polls,
            migrated.quarantined
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `calls get`: a call's record from Vyora's API, as pretty JSON.
fn calls_get(arg: &ConfigArg, call_id: &str) -> anyhow::Result<ExitCode> {
    let client = api_client(arg)?;
    let record = runtime()?.block_on(client.call(call_id))?;
    let value: serde_json::Value =
        serde_json::from_slice(&record).context("the answer is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(ExitCode::SUCCESS)
}

/// `agents list`: the workspace's agents from Vyora's API.
fn agents_list(
    arg: &ConfigArg,
    limit: Option<u64>,
    offset: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = api_client(arg)?;
    let list = runtime()?.block_on(client.agents(limit, offset))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!("{}", render::agents(&list.agents));
        if let Some(total) = list.total {
            println!("{} of {total} agents", list.agents.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `trigger`: realistic, correctly signed events sent to a router: the one `config`
/// describes (its webhook URL and first secret), unless `url` and `secret` say otherwise.
fn trigger(
    event: Trigger,
    config: Option<PathBuf>,
    url: Option<String>,
    secret: Option<String>,
    call_id: Option<String>,
) -> anyhow::Result<ExitCode> {
    let config = config
        .map(|path| Config::load(&ConfigSource::File(path)))
        .transpose()?;
    let url = match (url, &config) {
        (Some(url), _) => url,
        (None, Some(config)) => format!(
            "http://{}{}",
            vyora_router::net::loopback_for(config.server.listen),
            config.server.webhook_path
        ),
        (None, None) => DEFAULT_TRIGGER_URL.to_owned(),
    };
    // The config's secrets are the router's: from the file, else from the environment.
    let secret = match (secret, &config) {
        (Some(secret), _) => first_secret(&secret)?,
        (None, Some(config)) => config
            .webhook
            .secrets
            .first()
            .cloned()
            .context("the config has no webhook secret")?,
        (None, None) => first_secret(&std::env::var(SECRET_ENV).with_context(|| {
            format!("no signing secret: give --secret, --config or {SECRET_ENV}")
        })?)?,
    };
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
        println!(
            "{name} {call_id} -> {status} {}",
            render::printable(&answer)
        );
        all_ok &= (200..300).contains(&status);
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `sign`: `sha256=<hex>` for a body, as Vyora would sign it.
fn sign(secret: &str, file: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let secret = first_secret(secret)?;
    let body = match file {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
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

async fn serve_until_signalled(config: Config, source: ConfigSource) -> anyhow::Result<()> {
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
    // The lines the writer finds queued go out in one write: it flushes whenever the queue
    // is empty, so no line waits for later ones. A write per line (stdout flushes at each
    // newline) took a tenth of the router's CPU under load, most of it waking the reader.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .finish(std::io::BufWriter::with_capacity(
            LOG_WRITE_BYTES,
            std::io::stdout(),
        ));
    // Colours only for a person at a terminal, never into a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal());
    // On top of the operator's filter, whatever it says: lapin logs returned messages
    // whole (body and headers), and its traces print frames and the broker's password.
    let cap = vyora_router::sinks::amqp::log_cap();
    match config.log.format {
        LogFormat::Json => builder.json().finish().with(cap).init(),
        LogFormat::Text => builder.finish().with(cap).init(),
    }
    Ok(guard)
}
