//! Which connections a listener holds: at most its limit, and when all are taken a new one
//! is admitted by closing the one that has waited longest without a request in progress.
//!
//! A connection that has not sent a complete request head, or sits idle between requests,
//! costs its peer nothing to hold; if it kept its place until a timeout, one peer could
//! take every place and starve everyone else. Such a connection is idle here, and idle
//! connections form a queue oldest first: a connection that arrives when the listener is
//! full closes the head of that queue and takes its place. A connection whose request is
//! being read or answered is never closed for another.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

/// The connections of one listener.
pub struct Admission {
    limit: usize,
    state: Mutex<State>,
    /// Woken when a connection closes, goes idle, or declines to be closed because its
    /// request began as it was chosen: the connection waiting to be admitted looks again.
    changed: Notify,
}

struct State {
    /// Connections held, idle or not.
    open: usize,
    /// The key the next connection to go idle gets: keys grow, so the smallest is the
    /// connection idle longest.
    next_key: u64,
    /// The idle connections by key, each with the signal that closes it.
    idle: BTreeMap<u64, Arc<Notify>>,
}

impl Admission {
    pub fn new(limit: usize) -> Arc<Admission> {
        Arc::new(Admission {
            limit,
            state: Mutex::new(State {
                open: 0,
                next_key: 1,
                idle: BTreeMap::new(),
            }),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement: a panic elsewhere cannot leave
        // it half-changed.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new connection: at once while there is room; when full, the
    /// connection idle longest is closed to make room, or, with none idle, as soon as a
    /// connection closes or goes idle.
    pub async fn admit(self: &Arc<Self>) -> Arc<Connection> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change between the look and the wait wakes it.
            changed.as_mut().enable();
            {
                let mut state = self.state();
                if state.open < self.limit {
                    state.open += 1;
                    let evict = Arc::new(Notify::new());
                    let key = state.go_idle(&evict);
                    return Arc::new(Connection {
                        admission: Arc::clone(self),
                        key: AtomicU64::new(key),
                        evict,
                        requests: AtomicUsize::new(0),
                    });
                }
                if let Some((_, oldest)) = state.idle.pop_first() {
                    oldest.notify_one();
                }
            }
            changed.await;
        }
    }
}

impl State {
    /// Queues a connection as the newest idle one and returns its key.
    fn go_idle(&mut self, evict: &Arc<Notify>) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.idle.insert(key, Arc::clone(evict));
        key
    }
}

/// One admitted connection's place, given back when the last handle drops.
pub struct Connection {
    admission: Arc<Admission>,
    /// Its key in the idle queue while idle (0 while a request is in progress). A key
    /// the queue no longer holds means the connection was chosen to be closed.
    key: AtomicU64,
    /// Signalled once when the connection is chosen to be closed.
    evict: Arc<Notify>,
    /// Request heads hyper has handed over and whose answers are not written yet (one at
    /// a time in HTTP/1.1). Changed and read only on the connection's own task.
    requests: AtomicUsize,
}

impl Connection {
    /// Completes when the connection has been chosen to make room while idle; the caller
    /// then closes it. Chosen just as a request began, it keeps serving that request.
    pub async fn evicted(&self) {
        loop {
            self.evict.notified().await;
            if self.requests.load(Ordering::Relaxed) == 0 {
                return;
            }
            self.admission.changed.notify_waiters();
        }
    }

    /// Marks a request in progress until the returned guard drops (with the answer's body,
    /// once it has been written): meanwhile the connection is not idle.
    pub fn request(self: &Arc<Self>) -> InRequest {
        if self.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            let key = self.key.swap(0, Ordering::Relaxed);
            self.admission.state().idle.remove(&key);
        }
        InRequest {
            connection: Arc::clone(self),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        {
            let mut state = self.admission.state();
            state.idle.remove(self.key.get_mut());
            state.open -= 1;
        }
        self.admission.changed.notify_waiters();
    }
}

/// A request in progress on its connection; see [`Connection::request`].
pub struct InRequest {
    connection: Arc<Connection>,
}

impl Drop for InRequest {
    fn drop(&mut self) {
        let connection = &self.connection;
        if connection.requests.fetch_sub(1, Ordering::Relaxed) == 1 {
            let key = connection.admission.state().go_idle(&connection.evict);
            connection.key.store(key, Ordering::Relaxed);
            connection.admission.changed.notify_waiters();
        }
    }
}

/// An answer's body that holds its request's [`InRequest`] until hyper has written it.
pub struct Answering<B> {
    body: B,
    _request: InRequest,
}

impl<B> Answering<B> {
    pub fn new(body: B, request: InRequest) -> Answering<B> {
        Answering {
            body,
            _request: request,
        }
    }
}

impl<B: Body + Unpin> Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `future` completes within a moment.
    async fn completes<F: std::future::Future>(future: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(100), future)
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_full_listener_admits_a_newcomer_by_closing_the_connection_idle_longest() {
        let admission = Admission::new(3);
        let oldest = admission.admit().await;
        let served = admission.admit().await;
        let newer = admission.admit().await;
        // `served` became idle after its answer, later than `newer` arrived.
        drop(served.request());

        let newcomer = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit().await }
        });
        assert!(completes(oldest.evicted()).await.is_some());
        assert!(completes(newer.evicted()).await.is_none());
        assert!(completes(served.evicted()).await.is_none());
        drop(oldest);
        assert!(
            completes(newcomer).await.is_some(),
            "admitted once it closed"
        );
    }

    #[tokio::test]
    async fn a_connection_with_a_request_in_progress_is_never_closed_for_another() {
        let admission = Admission::new(2);
        let first = admission.admit().await;
        let second = admission.admit().await;
        let first_request = first.request();
        let second_request = second.request();

        let newcomer = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit().await }
        });
        assert!(completes(first.evicted()).await.is_none());
        assert!(completes(second.evicted()).await.is_none());

        // Answered, the second connection is idle: it makes room.
        drop(second_request);
        assert!(completes(second.evicted()).await.is_some());
        assert!(completes(first.evicted()).await.is_none());
        drop(second);
        assert!(completes(newcomer).await.is_some());
        drop(first_request);
    }

    #[tokio::test]
    async fn a_connection_chosen_as_its_request_begins_serves_it_and_another_makes_room() {
        let admission = Admission::new(2);
        let first = admission.admit().await;
        let second = admission.admit().await;
        let newcomer = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit().await }
        });
        // The newcomer chose `first`, whose request head arrives before it closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let request = first.request();
        assert!(completes(first.evicted()).await.is_none(), "kept serving");
        assert!(
            completes(second.evicted()).await.is_some(),
            "chosen instead"
        );
        drop(second);
        assert!(completes(newcomer).await.is_some());
        drop(request);
    }

    #[tokio::test]
    async fn every_place_comes_back_when_its_connection_closes() {
        let admission = Admission::new(2);
        for _ in 0..10 {
            let one = admission.admit().await;
            let request = one.request();
            let two = admission.admit().await;
            drop((request, one, two));
        }
        let state = admission.state();
        assert_eq!((state.open, state.idle.len()), (0, 0));
    }
}
