//! Request bodies read within a global memory budget: every byte of buffer a body takes is
//! first taken from one semaphore shared by all connections, so a thousand slow uploads
//! cannot pin more than the budget however large each one announces itself.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Buffer pages of one size: a body that grows takes whole pages instead of reallocating
/// (a growing buffer leaves freed blocks of every size behind, which costs a quarter more
/// memory than the budget counts).
const PAGE: usize = 16 * 1024;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("too many request bodies are being received at once")]
    OverBudget,
    #[error("the body could not be read: {0}")]
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// A body read in full, with the share of the budget it holds until dropped.
pub struct Buffered {
    pub bytes: Bytes,
    _held: Option<OwnedSemaphorePermit>,
}

/// What a body being read holds: its pages and their share of the budget.
struct Pages<'a> {
    budget: &'a Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    pages: Vec<Vec<u8>>,
    len: usize,
}

impl Pages<'_> {
    fn take(&mut self, bytes: usize) -> Result<(), BodyError> {
        let permits = u32::try_from(bytes).map_err(|_| BodyError::OverBudget)?;
        let more = Arc::clone(self.budget)
            .try_acquire_many_owned(permits)
            .map_err(|_| BodyError::OverBudget)?;
        match self.held.as_mut() {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }

    fn push(&mut self, mut data: &[u8], announced: usize) -> Result<(), BodyError> {
        while !data.is_empty() {
            let room = self.pages.last().map_or(0, |p| p.capacity() - p.len());
            if room == 0 {
                // A body that announced a small length gets exactly that: one allocation.
                let size = if self.pages.is_empty() && announced >= data.len() {
                    announced.min(PAGE)
                } else {
                    PAGE
                };
                self.take(size)?;
                self.pages.push(Vec::with_capacity(size));
                continue;
            }
            let (now, rest) = data.split_at(room.min(data.len()));
            if let Some(page) = self.pages.last_mut() {
                page.extend_from_slice(now);
            }
            self.len += now.len();
            data = rest;
        }
        Ok(())
    }

    /// One contiguous buffer: the single page as it is, or the pages joined (the joined
    /// copy takes its own share of the budget).
    fn finish(mut self) -> Result<Buffered, BodyError> {
        let bytes = if self.pages.len() <= 1 {
            Bytes::from(self.pages.pop().unwrap_or_default())
        } else {
            self.take(self.len)?;
            let mut joined = Vec::with_capacity(self.len);
            for page in self.pages.drain(..) {
                joined.extend_from_slice(&page);
            }
            Bytes::from(joined)
        };
        Ok(Buffered {
            bytes,
            _held: self.held,
        })
    }
}

/// Reads `body` (at most `limit` bytes), taking buffer space from `budget` as it arrives.
pub async fn read<B>(body: B, limit: usize, budget: &Arc<Semaphore>) -> Result<Buffered, BodyError>
where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>,
{
    let announced = usize::try_from(body.size_hint().exact().unwrap_or(0)).unwrap_or(limit);
    let mut pages = Pages {
        budget,
        held: None,
        pages: Vec::new(),
        len: 0,
    };
    tokio::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if pages.len + data.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        pages.push(&data, announced)?;
    }
    pages.finish()
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use hyper::body::Frame;

    use super::*;

    /// A body that arrives in the given chunks, with no length announced.
    struct Chunked(std::collections::VecDeque<&'static [u8]>);

    impl Body for Chunked {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            let next = self
                .0
                .pop_front()
                .map(|p| Ok(Frame::data(Bytes::from_static(p))));
            std::task::Poll::Ready(next)
        }
    }

    fn chunked(parts: &[&'static [u8]]) -> Chunked {
        Chunked(parts.iter().copied().collect())
    }

    #[tokio::test]
    async fn a_body_is_read_whole_and_gives_its_budget_back_when_dropped() {
        let budget = Arc::new(Semaphore::new(100_000));
        let big: &'static [u8] = Box::leak(vec![7u8; 40_000].into_boxed_slice());
        let body = read(chunked(&[b"abc", big, b"xyz"]), 1 << 20, &budget)
            .await
            .expect("read");
        assert_eq!(body.bytes.len(), 40_006);
        assert!(body.bytes.starts_with(b"abc") && body.bytes.ends_with(b"xyz"));
        assert!(budget.available_permits() < 100_000 - 40_006);
        drop(body);
        assert_eq!(budget.available_permits(), 100_000);
    }

    #[tokio::test]
    async fn a_small_announced_body_takes_exactly_its_length() {
        let budget = Arc::new(Semaphore::new(100_000));
        let body = read(
            Full::new(Bytes::from_static(b"{\"a\":1}")),
            1 << 20,
            &budget,
        )
        .await
        .expect("read");
        assert_eq!(&body.bytes[..], b"{\"a\":1}");
        assert_eq!(budget.available_permits(), 100_000 - 7);
    }

    #[tokio::test]
    async fn past_the_budget_a_body_is_refused_and_past_the_limit_too() {
        let budget = Arc::new(Semaphore::new(PAGE));
        let held = read(chunked(&[b"first"]), 1 << 20, &budget)
            .await
            .expect("fits");
        let refused = read(chunked(&[b"second"]), 1 << 20, &budget).await;
        assert!(matches!(refused, Err(BodyError::OverBudget)));
        drop(held);
        let too_large = read(chunked(&[b"0123456789"]), 4, &budget).await;
        assert!(matches!(too_large, Err(BodyError::TooLarge { limit: 4 })));
    }
}
