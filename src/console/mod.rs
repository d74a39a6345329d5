//! The operator console at `/ui` on the admin listener: sinks and their backlog, the
//! deliveries and a call's story, dead letters with replay, and a live view.
//!
//! Pages are rendered here with `maud`, which escapes every value (transcripts are speech
//! turned into text and may contain `<script>`); there is no JavaScript but the live
//! view's, served from the binary like the stylesheet. Who may see and change what is
//! decided in `auth`; every answer carries the strict headers of [`secure`].

mod auth;
mod live;
mod pages;
mod plots;
mod replay;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, LOCATION, REFERRER_POLICY,
    RETRY_AFTER, SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use maud::Markup;
use tokio_util::sync::CancellationToken;

pub use self::auth::NoRandom;
use self::auth::{Auth, COOKIE_NAME, Denied, LoginError};
use crate::config::AdminToken;
use crate::feed::Feed;
use crate::history::History;
use crate::live::LiveHandle;
use crate::poller::PollerHealth;
use crate::store::{Store, StoreError};

/// Every console path starts so.
const PREFIX: &str = "/ui";
/// The largest form the console reads.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// A form that has not arrived by then is refused.
const FORM_TIMEOUT: Duration = Duration::from_secs(10);
/// Only this console's own stylesheet and script; no frames, no foreign forms.
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'";
const STYLESHEET: &str = include_str!("static/console.css");
const LIVE_SCRIPT: &str = include_str!("static/live.js");

/// An answer of the console: a page, or the live view's endless stream.
pub type Page = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// What the console reads and changes, and its keys.
pub struct Console {
    /// Every page's figures and rows, and replays.
    store: Store,
    /// The running sinks, for their readiness.
    live: LiveHandle,
    /// The poller's state (none when it does not run).
    poller: Option<Arc<PollerHealth>>,
    auth: Auth,
    /// What the live view streams.
    feed: Feed,
    /// The last day's counts, for the overview's plots.
    history: Arc<History>,
    /// Cancelled when the listener stops, ending the live view's streams.
    closing: CancellationToken,
}

/// What the console works with beyond its token.
pub struct Parts {
    pub store: Store,
    pub live: LiveHandle,
    pub poller: Option<Arc<PollerHealth>>,
    pub feed: Feed,
    pub history: Arc<History>,
    pub closing: CancellationToken,
}

impl Console {
    pub fn new(token: Option<AdminToken>, parts: Parts) -> Result<Console, NoRandom> {
        let Parts {
            store,
            live,
            poller,
            feed,
            history,
            closing,
        } = parts;
        Ok(Console {
            store,
            live,
            poller,
            auth: Auth::new(token)?,
            feed,
            history,
            closing,
        })
    }
}

/// Whether `path` is the console's.
pub fn is_console_path(path: &str) -> bool {
    path == PREFIX || path.starts_with("/ui/")
}

/// Why a console request got no page. Each variant maps to one status in [`refused`].
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("no such page")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Denied(Denied),
    #[error("{0}")]
    BadRequest(String),
    #[error("the store did not answer; see the router's log")]
    Store(#[from] StoreError),
}

/// Answers one request for a console path.
pub async fn handle<B>(console: &Console, req: Request<B>) -> Page
where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send,
{
    let get = req.method() == Method::GET;
    let mut page = match route(console, req).await {
        Ok(page) => page,
        Err(refusal) => refused(refusal, get, console.auth.has_token()),
    };
    secure(&mut page);
    page
}

async fn route<B>(console: &Console, req: Request<B>) -> Result<Page, Refusal>
where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send,
{
    let (parts, body) = req.into_parts();
    let query = Query::of(parts.uri.query());
    let path = parts.uri.path();
    match (&parts.method, path) {
        (&Method::GET, "/ui/static/console.css") => {
            return Ok(with_type(
                Bytes::from_static(STYLESHEET.as_bytes()),
                "text/css",
            ));
        }
        (&Method::GET, "/ui/static/live.js") => {
            return Ok(with_type(
                Bytes::from_static(LIVE_SCRIPT.as_bytes()),
                "text/javascript",
            ));
        }
        (&Method::GET, "/ui/login") => {
            if !console.auth.has_token() {
                return Ok(redirect(PREFIX));
            }
            return Ok(html(StatusCode::OK, pages::login(None)));
        }
        (&Method::POST, "/ui/login") => {
            auth::check_origin(&parts.headers).map_err(Refusal::Denied)?;
            let form = read_form(body).await?;
            return match console
                .auth
                .login(form.get("token").unwrap_or("").as_bytes())
            {
                Ok(cookie) => {
                    tracing::info!("console login");
                    let mut page = redirect(PREFIX);
                    set_cookie(
                        &mut page,
                        &format!(
                            "{COOKIE_NAME}={cookie}; Path={PREFIX}; HttpOnly; SameSite=Strict"
                        ),
                    );
                    Ok(page)
                }
                Err(LoginError::Denied(Denied::Throttled(wait))) => {
                    Err(Refusal::Denied(Denied::Throttled(wait)))
                }
                Err(LoginError::Denied(_)) => {
                    tracing::warn!("console login refused: wrong token");
                    Ok(html(
                        StatusCode::UNAUTHORIZED,
                        pages::login(Some("That is not the token.")),
                    ))
                }
                Err(LoginError::Random(e)) => Err(Refusal::BadRequest(e.to_string())),
            };
        }
        _ => {}
    }
    let session = console
        .auth
        .session(&parts.headers)
        .map_err(Refusal::Denied)?;
    let changes = |form: &Query| -> Result<(), Refusal> {
        auth::check_origin(&parts.headers).map_err(Refusal::Denied)?;
        console
            .auth
            .check_csrf(&session, form.get("csrf"))
            .map_err(Refusal::Denied)
    };
    let view = pages::View {
        console,
        csrf: &session.csrf,
    };
    let page = match (&parts.method, path) {
        (&Method::GET, PREFIX) => view.overview().await?,
        (&Method::GET, "/ui/events") => view.events(&query).await?,
        (&Method::GET, "/ui/call") => view.call(&query).await?,
        (&Method::GET, "/ui/dead") => view.dead(&query).await?,
        (&Method::GET, "/ui/replay") => view.confirm_replay(&query)?,
        (&Method::GET, "/ui/backfill") => view.confirm_backfill(&query)?,
        (&Method::GET, "/ui/live") => view.live(),
        (&Method::GET, "/ui/live/events") => {
            let stream = live::stream(&console.feed, console.closing.clone());
            let mut page = Response::new(stream.boxed_unsync());
            page.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            return Ok(page);
        }
        (&Method::POST, "/ui/replay") => {
            let form = read_form(body).await?;
            changes(&form)?;
            view.replay(&form).await?
        }
        (&Method::POST, "/ui/backfill") => {
            let form = read_form(body).await?;
            changes(&form)?;
            view.backfill(&form).await?
        }
        (&Method::POST, "/ui/logout") => {
            let form = read_form(body).await?;
            changes(&form)?;
            let mut page = redirect("/ui/login");
            set_cookie(
                &mut page,
                &format!("{COOKIE_NAME}=; Path={PREFIX}; HttpOnly; SameSite=Strict; Max-Age=0"),
            );
            return Ok(page);
        }
        (
            _,
            PREFIX | "/ui/events" | "/ui/call" | "/ui/dead" | "/ui/replay" | "/ui/backfill"
            | "/ui/logout" | "/ui/live" | "/ui/live/events",
        ) => {
            return Err(Refusal::MethodNotAllowed);
        }
        _ => return Err(Refusal::NotFound),
    };
    Ok(html(StatusCode::OK, page))
}

/// Every status code of the console is decided here.
fn refused(refusal: Refusal, get: bool, has_token: bool) -> Page {
    let status = match &refusal {
        Refusal::Denied(Denied::NoCredentials | Denied::Wrong) if get && has_token => {
            return redirect("/ui/login");
        }
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Refusal::Denied(Denied::NoCredentials | Denied::Wrong) => StatusCode::UNAUTHORIZED,
        Refusal::Denied(Denied::ForeignHost | Denied::ForeignOrigin | Denied::Csrf) => {
            StatusCode::FORBIDDEN
        }
        Refusal::Denied(Denied::Throttled(wait)) => {
            let mut page = html(
                StatusCode::TOO_MANY_REQUESTS,
                pages::problem(StatusCode::TOO_MANY_REQUESTS, &refusal.to_string()),
            );
            page.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*wait));
            return page;
        }
        Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refusal::Store(e) => {
            tracing::warn!(error = %e, "the console's store query failed");
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    html(status, pages::problem(status, &refusal.to_string()))
}

/// The headers every console answer carries.
fn secure(page: &mut Page) {
    let headers = page.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not no-referrer: Chromium then sends `Origin: null` with same-origin POSTs.
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn with_type(body: Bytes, content_type: &'static str) -> Page {
    let mut page = Response::new(Full::new(body).boxed_unsync());
    page.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    page
}

fn html(status: StatusCode, markup: Markup) -> Page {
    let mut page = with_type(
        Bytes::from(markup.into_string()),
        "text/html; charset=utf-8",
    );
    *page.status_mut() = status;
    page
}

/// A 303 to a console path (a constant, never a value from the request).
fn redirect(to: &'static str) -> Page {
    let mut page = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *page.status_mut() = StatusCode::SEE_OTHER;
    page.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    page
}

fn set_cookie(page: &mut Page, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        page.headers_mut().append(SET_COOKIE, v);
    }
}

/// A query string or a form's fields.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn of(text: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(text.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The field's first value, if it has a non-empty one.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// Reads a form body within a size and a time limit.
async fn read_form<B>(body: B) -> Result<Query, Refusal>
where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send,
{
    let read = tokio::time::timeout(FORM_TIMEOUT, Limited::new(body, MAX_FORM_BYTES).collect());
    let bytes = match read.await {
        Err(_) => {
            return Err(Refusal::BadRequest(
                "the form did not arrive in time".into(),
            ));
        }
        Ok(Err(_)) => {
            return Err(Refusal::BadRequest(format!(
                "the form could not be read, or is larger than {MAX_FORM_BYTES} bytes"
            )));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Refusal::BadRequest("the form is not UTF-8".into()))?;
    Ok(Query::of(Some(text)))
}
