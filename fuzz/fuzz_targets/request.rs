//! The whole request handler, without sockets: any method, path, headers and body get an
//! answer (never a panic, never a 500), and a 200 on the webhook path only ever follows
//! a correct signature.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use libfuzzer_sys::fuzz_target;
use vyora_router::config::Config;
use vyora_router::live::{Live, LiveHandle};
use vyora_router::metrics::Metrics;
use vyora_router::routing::Router;
use vyora_router::server::{self, Components, State};
use vyora_router::signature::{Secret, sign};
use vyora_router::store::{Store, StoreOptions};

struct Harness {
    runtime: tokio::runtime::Runtime,
    state: Arc<State>,
    secret: Secret,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::from_toml(&format!(
            "[webhook]\nsecrets = [\"fuzz-secret\"]\n[store]\npath = \"{}\"\nsynchronous = \"normal\"\n[server]\nmax_body_bytes = 4096\n",
            dir.path().join("fuzz.db").display()
        ))
        .expect("config");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        // The store's writer thread lives for the whole fuzzing run.
        let store = runtime
            .block_on(Store::open(&config.store, StoreOptions::default()))
            .expect("store");
        let live = LiveHandle::new(Live {
            secrets: config.webhook.secrets.clone(),
            router: Router::new(&config.sinks),
            sinks: Vec::new(),
            max_event_age: config.webhook.max_event_age,
            max_clock_skew: config.webhook.max_clock_skew,
        });
        let components = Components {
            store,
            live,
            poller: None,
            metrics: Arc::new(Metrics::new()),
            console: None,
            feed: Default::default(),
        };
        let state = Arc::new(State::new(&config, components));
        let secret = Secret::new(b"fuzz-secret").expect("secret");
        Harness { runtime, state, secret, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let [method, path, sig_mode, header_len, rest @ ..] = data else { return };
    let header_len = usize::from(*header_len).min(rest.len());
    let (event_header, body) = rest.split_at(header_len);
    let method = ["POST", "GET", "PUT", "HEAD", "DELETE"][usize::from(*method) % 5];
    let path = ["/webhook", "/healthz", "/readyz", "/metrics", "/x"][usize::from(*path) % 5];
    let mut request = Request::builder().method(method).uri(path);
    let genuine = sign(&h.secret, body);
    let signed = match sig_mode % 4 {
        0 => {
            request = request.header("x-vyora-signature", genuine.as_str());
            true
        }
        1 => {
            if let Ok(v) = hyper::header::HeaderValue::from_bytes(event_header) {
                request = request.header("x-vyora-signature", v);
            }
            false
        }
        2 => {
            request = request.header("x-vyora-signature", genuine.as_str()).header("x-vyora-signature", genuine.as_str());
            false
        }
        _ => false,
    };
    if let Ok(v) = hyper::header::HeaderValue::from_bytes(event_header) {
        request = request.header("x-vyora-event", v);
    }
    let Ok(request) = request.body(Full::new(Bytes::copy_from_slice(body))) else { return };
    let response = h
        .runtime
        .block_on(server::handle(Arc::clone(&h.state), server::Surface::Public, request))
        .expect("infallible");
    let status = response.status().as_u16();
    assert!(status < 500 || status == 503, "answered {status}");
    if path == "/webhook" && method == "POST" && status == 200 {
        assert!(signed, "a 200 without a correct signature");
    }
});
