//! A real downstream HTTP server on port 0 that records every request and answers as the
//! test scripts it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    StatusWith(u16, Vec<(&'static str, String)>),
    /// A status with a JSON body.
    Json(u16, serde_json::Value),
    /// Wait, then answer 200 (for timeouts: the router gives up first).
    Slow(Duration),
}

type Script = dyn Fn(&Received, usize) -> Reply + Send + Sync;

pub struct Downstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Arc<Script>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Downstream {
    /// Starts answering every request with `script(request, index)`.
    pub async fn start(
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Downstream {
        Downstream::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    /// The same, on a given address (a downstream that comes back where it was).
    pub async fn start_on(
        addr: SocketAddr,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Downstream {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<Arc<Script>>> = Arc::new(Mutex::new(Arc::new(script)));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let d = Downstream {
            addr,
            received: Arc::clone(&received),
            script: Arc::clone(&script),
            in_flight: Arc::clone(&in_flight),
            max_in_flight: Arc::clone(&max_in_flight),
        };
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let received = Arc::clone(&received);
                let script = Arc::clone(&script);
                let in_flight = Arc::clone(&in_flight);
                let max_in_flight = Arc::clone(&max_in_flight);
                let service = service_fn(move |req: Request<Incoming>| {
                    let received = Arc::clone(&received);
                    let script = Arc::clone(&script);
                    let in_flight = Arc::clone(&in_flight);
                    let max_in_flight = Arc::clone(&max_in_flight);
                    async move {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_in_flight.fetch_max(now, Ordering::SeqCst);
                        // Counted out when the request ends, also when hyper drops it
                        // because the client went away (a timed-out request).
                        let _in_flight = InFlight(Arc::clone(&in_flight));
                        let at = Instant::now();
                        let path = req.uri().path().to_owned();
                        let headers = req.headers().clone();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let r = Received {
                            at,
                            path,
                            headers,
                            body,
                        };
                        let index = {
                            let mut all = received.lock().expect("lock");
                            all.push(r.clone());
                            all.len() - 1
                        };
                        let script = Arc::clone(&*script.lock().expect("lock"));
                        let reply = script(&r, index);
                        let response = match reply {
                            Reply::Status(code) => answer(code, &[]),
                            Reply::StatusWith(code, headers) => answer(code, &headers),
                            Reply::Json(code, body) => Response::builder()
                                .status(code)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .expect("response"),
                            Reply::Slow(wait) => {
                                tokio::time::sleep(wait).await;
                                answer(200, &[])
                            }
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        d
    }

    /// Changes how later requests are answered.
    pub fn set_script(&self, script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) {
        *self.script.lock().expect("lock") = Arc::new(script);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// How many requests arrived, without copying them.
    pub fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests arrived, or panics after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            // Counted without copying: a copy per look is quadratic in a long wait.
            let got = self.count();
            if got >= n {
                return self.received();
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} requests downstream, got {got}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn answer(code: u16, headers: &[(&'static str, String)]) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(code);
    for (k, v) in headers {
        builder = builder.header(*k, v.as_str());
    }
    builder
        .body(Full::new(Bytes::from(format!(
            "downstream answered {code}"
        ))))
        .expect("response")
}
