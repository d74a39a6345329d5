//! Payloads as the event log stores them: zstd-compressed when that is smaller, always
//! handed back as the bytes that were signed.

use std::cell::RefCell;

use bytes::Bytes;

/// Payloads as signed; [`CODEC_ZSTD`]: zstd-compressed, which JSON with transcripts takes
/// well (the bytes a sink receives are always the signed ones).
pub(super) const CODEC_RAW: i64 = 0;
pub(super) const CODEC_ZSTD: i64 = 1;
/// zstd's level: fast, and most of the gain of the higher ones on JSON this size.
pub(super) const ZSTD_LEVEL: i32 = 3;

/// The largest payload a stored frame may claim to hold: far above any body the server
/// accepts, so only a damaged row is refused, before a large allocation.
pub(super) const MAX_STORED_PAYLOAD: u64 = 64 * 1024 * 1024;

thread_local! {
    // A zstd context costs more to create than to compress a webhook with: each thread
    // keeps one of each.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The payload as stored, and how.
pub(super) fn compress(payload: &[u8]) -> (Vec<u8>, i64) {
    let packed = COMPRESSOR.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut().map(|c| c.compress(payload))
    });
    match packed {
        Some(Ok(packed)) if packed.len() < payload.len() => (packed, CODEC_ZSTD),
        _ => (payload.to_vec(), CODEC_RAW),
    }
}

/// The payload as signed, from what is stored.
pub(super) fn decompress(codec: i64, stored: Vec<u8>) -> std::io::Result<Bytes> {
    if codec != CODEC_ZSTD {
        return Ok(Bytes::from(stored));
    }
    let size = zstd::zstd_safe::get_frame_content_size(&stored)
        .ok()
        .flatten()
        .filter(|size| *size <= MAX_STORED_PAYLOAD)
        .and_then(|size| usize::try_from(size).ok())
        .ok_or_else(|| std::io::Error::other("no plausible content size in the zstd frame"))?;
    DECOMPRESSOR.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(&stored, size).map(Bytes::from),
            None => Err(std::io::Error::other("no zstd decompressor")),
        }
    })
}
