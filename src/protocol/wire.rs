//! The pp frame: an 8-byte big-endian length followed by that many payload
//! bytes. The same framing is spoken on client sockets and on worker pipes,
//! so the reader and writer here are generic over any async byte stream.
//!
//! Decoding is split from I/O: [`decode`] only looks at a buffer;
//! [`FrameReader`] owns a stream and its read buffer (a worker's stdout),
//! and [`Connection`] adds the writes for a two-way stream (a client
//! socket). Payloads come out as [`Bytes`] cut from the read buffer, so
//! relaying them costs no copy; payloads of [`crate::memory::mapped::MAPPED_MIN`]
//! or more skip the read buffer and are read into a mapping of their own,
//! which a worker's pipe can take by reference.
//!
//! The reader is written by hand rather than taken from tokio-util's
//! `LengthDelimitedCodec`: that codec reserves the whole announced length
//! as soon as it reads a header, which lets a peer make the server allocate
//! up to the frame limit by sending 8 bytes; here the buffer grows with the
//! bytes that actually arrive. Lengths come from peers, so every sum of a
//! length and anything else is checked.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::memory::mapped::{Filling, MAPPED_MIN};
use crate::memory::spares::Spares;

/// Size of the length header in front of every frame.
pub const HEADER_LEN: usize = 8;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer announced a payload larger than this side accepts; nothing
    /// was allocated for it.
    TooLarge { announced: u64, max: usize },
    /// The stream ended in the middle of a frame.
    Truncated,
    /// The peer sent bytes while it should have been waiting for an
    /// answer (see [`Connection::closed`]): `received` of them, thrown
    /// away, so the frames after them cannot be read.
    Unsolicited { received: usize },
    /// The underlying read failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { announced, max } => {
                write!(f, "frame of {announced} bytes announced, limit is {max}")
            }
            FrameError::Truncated => write!(f, "connection closed in the middle of a frame"),
            FrameError::Unsolicited { received } => write!(
                f,
                "peer sent {received} bytes while it should have been waiting for an answer"
            ),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// What [`decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame's payload, removed from the buffer.
    Frame(Bytes),
    /// Not enough bytes yet; `missing` more are needed at least.
    Incomplete { missing: usize },
}

/// Takes one frame off the front of `buf` if it is all there.
///
/// The announced length is checked against `max` before anything else, so a
/// header announcing 2^62 bytes is refused without reserving memory for it.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Decoded, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete {
            missing: HEADER_LEN - buf.len(),
        });
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let announced = u64::from_be_bytes(header);
    if announced > max as u64 {
        return Err(FrameError::TooLarge { announced, max });
    }
    // Both conversions and the sum are checked: `max` may be as large as
    // usize allows, and a frame that cannot be addressed is too large.
    let too_large = || FrameError::TooLarge { announced, max };
    let len = usize::try_from(announced).map_err(|_| too_large())?;
    let total = HEADER_LEN.checked_add(len).ok_or_else(too_large)?;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            missing: total - buf.len(),
        });
    }
    buf.advance(HEADER_LEN);
    Ok(Decoded::Frame(buf.split_to(len).freeze()))
}

/// The bytes of one frame carrying `payload`: header and payload. Answers
/// go out through [`write_frames`] without this copy; this is for building
/// test input and transcripts.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Read size while discarding a frame: the read buffer is made this large
/// if it is smaller, and never grows past its size while discarding.
const DISCARD_CHUNK: usize = 64 * 1024;

/// Room the read buffer gets, at least, for bytes that arrive while the
/// peer should be waiting and that are thrown away.
const UNSOLICITED_CHUNK: usize = 4096;

/// Below this, a frame's buffer is reserved in one go; above it the buffer
/// grows with the bytes that actually arrive, so a peer that announces a
/// large frame and sends little costs little.
const EAGER_RESERVE: usize = 1 << 20;

/// Reads whole frames from a stream, buffering partial ones.
///
/// Every method is cancel-safe: bytes already read stay in the buffer, so a
/// `select!` that drops a pending read loses nothing.
#[derive(Debug)]
pub struct FrameReader<R> {
    /// The stream frames are read from.
    inner: R,
    /// Bytes read but not yet handed out as frames.
    buf: BytesMut,
    /// Largest payload accepted; see [`FrameReader::set_max`].
    max: usize,
    /// A large frame whose header is consumed, being read straight into a
    /// mapping of its own ([`crate::memory::mapped`]) rather than into `buf`.
    large: Option<Filling>,
    /// Where large frames' mappings come from and go back to, counted in
    /// the memory budget; `None` (worker results, tests): fresh mappings,
    /// unmapped with their frames.
    spares: Option<Arc<Spares>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that accepts payloads up to `max` bytes.
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            max,
            large: None,
            spares: None,
        }
    }

    /// Takes large frames' mappings from `spares` and gives them back
    /// there: for a client's frames, which the memory budget counts.
    pub(crate) fn set_spares(&mut self, spares: Arc<Spares>) {
        self.spares = Some(spares);
    }

    /// Changes the payload limit, e.g. from the small pre-authentication
    /// cap to the configured maximum once the peer has authenticated.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes the read buffer can hold now: what reading has cost in memory.
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity() + self.large.as_ref().map_or(0, Filling::filled)
    }

    /// The stream, for writing answers on it.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads the next frame. `Ok(None)` is a clean end of stream between
    /// frames; an end of stream inside a frame is [`FrameError::Truncated`].
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(large) = &mut self.large {
                if large.is_full() {
                    return Ok(self.large.take().map(Filling::freeze));
                }
                // Straight into the frame's own memory: no copy out of a
                // read buffer, and no buffer to grow.
                match self.inner.read(large.unfilled()?).await? {
                    0 => return Err(FrameError::Truncated),
                    n => large.advance(n),
                }
                continue;
            }
            let missing = match decode(&mut self.buf, self.max)? {
                Decoded::Frame(frame) => {
                    if frame.len() >= EAGER_RESERVE {
                        self.release_large_buffer();
                    }
                    return Ok(Some(frame));
                }
                Decoded::Incomplete { missing } => missing,
            };
            if self.buf.len() >= HEADER_LEN && self.map_large_frame(missing)? {
                continue;
            }
            if self.buf.capacity() - self.buf.len() < missing {
                // Grow geometrically past EAGER_RESERVE instead of trusting
                // the announced length with a single huge allocation.
                let grow = missing.min(self.buf.len().max(EAGER_RESERVE));
                self.buf.reserve(grow);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// With a whole header in `buf` and `missing` bytes of its frame still
    /// to come: if the frame is large, moves it to a mapping of its own
    /// (header consumed, the payload bytes already read copied over) and
    /// says so. False when the frame is small or no mapping can be had.
    fn map_large_frame(&mut self, missing: usize) -> io::Result<bool> {
        let len = self.buf.len() - HEADER_LEN + missing;
        if len < MAPPED_MIN {
            return Ok(false);
        }
        let Some(mut large) = Filling::new(len, self.spares.as_ref()) else {
            return Ok(false);
        };
        self.buf.advance(HEADER_LEN);
        let taken = large.extend_from(&self.buf)?;
        self.buf.advance(taken);
        if self.buf.capacity() > EAGER_RESERVE {
            // What the buffer grew to for this frame's start goes back.
            self.buf = BytesMut::with_capacity(8 * 1024);
        }
        self.large = Some(large);
        Ok(true)
    }

    /// A large frame shares its allocation with the read buffer; if the
    /// buffer kept it, the next reserve would take the whole block back
    /// once the frame is dropped, and a connection (or an idle worker)
    /// would hold the memory of its largest frame for good. Moving the few
    /// leftover bytes to a fresh buffer leaves the block to the frame
    /// alone, freed with it.
    fn release_large_buffer(&mut self) {
        let mut fresh = BytesMut::with_capacity(self.buf.len().max(8 * 1024));
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
    }
}

/// A two-way framed stream: a client connection. Owns the stream and its
/// read buffer; answers are written on the same stream.
#[derive(Debug)]
pub struct Connection<S> {
    /// The stream and the bytes read from it but not yet handed out.
    reader: FrameReader<S>,
    /// How long a write may make no progress before it fails; see
    /// [`Connection::set_write_stall`].
    write_stall: Option<Duration>,
    /// Bytes the peer sent while it should have been waiting, thrown away
    /// by [`Connection::closed`]: once any were, the frames after them
    /// cannot be found, and reading fails.
    unsolicited: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A connection that accepts payloads up to `max` bytes.
    pub fn new(stream: S, max: usize) -> Self {
        Connection {
            reader: FrameReader::new(stream, max),
            write_stall: None,
            unsolicited: 0,
        }
    }

    /// Makes a write that makes no progress for `stall` fail with
    /// `TimedOut`, so a peer that stops reading cannot pin an answer (and
    /// its memory) for as long as it keeps the socket open. A slow reader
    /// that keeps taking bytes is not cut off.
    pub fn set_write_stall(&mut self, stall: Duration) {
        self.write_stall = Some(stall);
    }

    /// See [`FrameReader::set_max`].
    pub fn set_max(&mut self, max: usize) {
        self.reader.set_max(max);
    }

    /// See [`FrameReader::set_spares`].
    pub(crate) fn set_spares(&mut self, spares: Arc<Spares>) {
        self.reader.set_spares(spares);
    }

    /// Fails once bytes were thrown away by [`Connection::closed`]: what
    /// follows them is no frame boundary anyone knows.
    fn in_step(&self) -> Result<(), FrameError> {
        match self.unsolicited {
            0 => Ok(()),
            received => Err(FrameError::Unsolicited { received }),
        }
    }

    /// See [`FrameReader::buffered_capacity`].
    pub fn buffered_capacity(&self) -> usize {
        self.reader.buffered_capacity()
    }

    /// See [`FrameReader::read_frame`]; fails after
    /// [`Connection::closed`] threw bytes away.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.in_step()?;
        self.reader.read_frame().await
    }

    /// Waits for the next frame's header and returns the payload length it
    /// announces (checked against the limit), leaving the frame to be read
    /// with [`Connection::read_frame`] or dropped with
    /// [`Connection::discard_frame`]: the caller decides, knowing the size,
    /// before the payload is read. `None` is a clean end of stream.
    /// Cancel-safe. Fails after [`Connection::closed`] threw bytes away.
    pub async fn read_header(&mut self) -> Result<Option<usize>, FrameError> {
        self.in_step()?;
        let r = &mut self.reader;
        if let Some(large) = &r.large {
            // Its header was taken when its payload started to arrive.
            return Ok(Some(large.len()));
        }
        while r.buf.len() < HEADER_LEN {
            r.buf.reserve(HEADER_LEN);
            if r.inner.read_buf(&mut r.buf).await? == 0 {
                return if r.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
        let announced = u64::from_be_bytes(r.buf[..HEADER_LEN].try_into().unwrap_or_default());
        match usize::try_from(announced) {
            Ok(len) if len <= r.max => Ok(Some(len)),
            _ => Err(FrameError::TooLarge {
                announced,
                max: r.max,
            }),
        }
    }

    /// Reads the next frame and throws its payload away as it arrives,
    /// holding at most one read buffer of it; returns its length. For a
    /// frame too large to keep, whose job is answered without it.
    pub async fn discard_frame(&mut self) -> Result<usize, FrameError> {
        self.in_step()?;
        let (len, mut left) = match self.reader.large.take() {
            Some(large) => (large.len(), large.len() - large.filled()),
            None => {
                let Some(len) = self.read_header().await? else {
                    return Err(FrameError::Truncated);
                };
                self.reader.buf.advance(HEADER_LEN);
                (len, len)
            }
        };
        let r = &mut self.reader;
        loop {
            let take = left.min(r.buf.len());
            r.buf.advance(take);
            left -= take;
            if left == 0 {
                return Ok(len);
            }
            if r.buf.capacity() < DISCARD_CHUNK {
                r.buf = BytesMut::with_capacity(DISCARD_CHUNK);
            }
            if r.inner.read_buf(&mut r.buf).await? == 0 {
                return Err(FrameError::Truncated);
            }
        }
    }

    /// Writes one frame; see [`write_frame`] and
    /// [`Connection::set_write_stall`].
    pub async fn write_frame(&mut self, payload: &[u8]) -> io::Result<()> {
        write_frames_within(&mut self.reader.inner, &[payload], self.write_stall)
            .await
            .map_err(|e| e.error)
    }

    /// Completes with `Ok` when the peer closes its side, for noticing that
    /// a client went away while its job runs. A pp client sends nothing
    /// while it waits for an answer, so bytes that arrive meanwhile are
    /// not kept: they are counted and thrown away as they come, through
    /// the read buffer, which does not grow for them (a peer sending a
    /// whole frame here costs no memory beyond that buffer). The answer
    /// owed is still written, but reading goes no further
    /// ([`FrameError::Unsolicited`]). A peer that sends more than a
    /// maximal frame while it should be waiting ends the wait with that
    /// error. Cancel-safe.
    pub async fn closed(&mut self) -> Result<(), FrameError> {
        let r = &mut self.reader;
        loop {
            // Bytes already read past the last frame count too.
            self.unsolicited = self.unsolicited.saturating_add(r.buf.len());
            r.buf.clear();
            if self.unsolicited > HEADER_LEN.saturating_add(r.max) {
                return Err(FrameError::Unsolicited {
                    received: self.unsolicited,
                });
            }
            if r.buf.capacity() < UNSOLICITED_CHUNK {
                // The buffer is empty: this reuses its memory if it can.
                r.buf.reserve(UNSOLICITED_CHUNK);
            }
            if r.inner.read_buf(&mut r.buf).await? == 0 {
                return Ok(());
            }
        }
    }
}

/// Writes one frame, header and payload together in as few writes as the
/// stream allows (one `writev` on a socket), so Nagle's algorithm never
/// holds back a lone header. The payload is not copied.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> io::Result<()> {
    write_frames(w, &[payload]).await.map_err(|e| e.error)
}

/// A write that failed after `written` bytes had gone out.
#[derive(Debug)]
pub struct PartialWrite {
    /// Bytes written before the error.
    pub written: usize,
    /// The error.
    pub error: io::Error,
}

/// Most frames [`write_frames`] sends in one call.
pub const MAX_FRAMES_PER_WRITE: usize = 2;

/// Writes up to [`MAX_FRAMES_PER_WRITE`] frames back to back with as few
/// writes as possible (a job's package and arguments go to a worker in one
/// `writev`: one syscall and one wake-up of the worker instead of two).
/// On failure it says how much had been written, so a caller can tell a
/// peer that was gone before anything reached it.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    payloads: &[&[u8]],
) -> Result<(), PartialWrite> {
    write_frames_within(w, payloads, None).await
}

/// Writes `payload` as a frame, then only the header of a frame of
/// `next_len` bytes, in one `writev`: what goes ahead of a payload that is
/// sent by other means (`vmsplice`, [`crate::memory::mapped`]).
pub(crate) async fn write_heads<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
    next_len: usize,
) -> Result<(), PartialWrite> {
    let header = (payload.len() as u64).to_be_bytes();
    let next = (next_len as u64).to_be_bytes();
    let mut slices = [
        IoSlice::new(&header),
        IoSlice::new(payload),
        IoSlice::new(&next),
    ];
    write_slices(w, &mut slices, None).await
}

/// [`write_frames`], failing with `TimedOut` when a single write makes no
/// progress for `stall`.
async fn write_frames_within<W: AsyncWrite + Unpin>(
    w: &mut W,
    payloads: &[&[u8]],
    stall: Option<Duration>,
) -> Result<(), PartialWrite> {
    assert!(payloads.len() <= MAX_FRAMES_PER_WRITE, "too many frames");
    let mut headers = [[0u8; HEADER_LEN]; MAX_FRAMES_PER_WRITE];
    for (h, p) in headers.iter_mut().zip(payloads) {
        *h = (p.len() as u64).to_be_bytes();
    }
    let mut slices = [IoSlice::new(&[]); 2 * MAX_FRAMES_PER_WRITE];
    for (i, p) in payloads.iter().enumerate() {
        slices[2 * i] = IoSlice::new(&headers[i]);
        slices[2 * i + 1] = IoSlice::new(p);
    }
    write_slices(w, &mut slices[..2 * payloads.len()], stall).await
}

/// Writes all of `slices` with vectored writes, then flushes; see
/// [`write_frames_within`] for `stall`.
async fn write_slices<W: AsyncWrite + Unpin>(
    w: &mut W,
    slices: &mut [IoSlice<'_>],
    stall: Option<Duration>,
) -> Result<(), PartialWrite> {
    let mut rest = slices;
    let mut written = 0;
    loop {
        // Skip drained slices so an empty payload never looks like the end.
        IoSlice::advance_slices(&mut rest, 0);
        if rest.is_empty() {
            break;
        }
        let wrote = match stall {
            None => w.write_vectored(rest).await,
            Some(stall) => tokio::time::timeout(stall, w.write_vectored(rest))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        };
        match wrote {
            Ok(0) => {
                return Err(PartialWrite {
                    written,
                    error: io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(error) => return Err(PartialWrite { written, error }),
        }
    }
    w.flush()
        .await
        .map_err(|error| PartialWrite { written, error })
}

/// A TCP stream that re-arms `TCP_QUICKACK` after every read.
///
/// pp clients send a frame's header and payload in two `send()` calls with
/// Nagle's algorithm on, so the payload waits until the header is
/// acknowledged. Linux delays that ACK by up to 40 ms unless quick-ack mode
/// is on, and it leaves that mode on its own; re-arming it after each read
/// keeps every job from stalling.
#[derive(Debug)]
pub struct QuickAck(pub tokio::net::TcpStream);

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Best effort: failing to set it only costs latency.
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        res
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_header_and_partial_payload_are_incomplete() {
        let bytes = encode_frame(b"hello");
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            match decode(&mut buf, 100).unwrap() {
                Decoded::Incomplete { missing } => {
                    let expect = if cut < HEADER_LEN {
                        HEADER_LEN - cut
                    } else {
                        bytes.len() - cut
                    };
                    assert_eq!(missing, expect);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert_eq!(buf.len(), cut, "an incomplete frame consumes nothing");
        }
    }

    #[test]
    fn back_to_back_frames_come_out_in_order() {
        let mut bytes = encode_frame(b"one");
        bytes.extend(encode_frame(b""));
        bytes.extend(encode_frame(b"three"));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, 10).unwrap(),
            Decoded::Frame(Bytes::from_static(b"one"))
        );
        assert_eq!(decode(&mut buf, 10).unwrap(), Decoded::Frame(Bytes::new()));
        assert_eq!(
            decode(&mut buf, 10).unwrap(),
            Decoded::Frame(Bytes::from_static(b"three"))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_header_is_refused_before_payload_arrives() {
        let mut buf = BytesMut::from(&(1u64 << 62).to_be_bytes()[..]);
        match decode(&mut buf, 1 << 20) {
            Err(FrameError::TooLarge { announced, max }) => {
                assert_eq!(announced, 1 << 62);
                assert_eq!(max, 1 << 20);
            }
            other => panic!("{other:?}"),
        }
        // Exactly at the limit is fine.
        let mut buf = BytesMut::from(&encode_frame(&[7u8; 16])[..]);
        assert!(matches!(decode(&mut buf, 16), Ok(Decoded::Frame(_))));
        let mut buf = BytesMut::from(&encode_frame(&[7u8; 17])[..]);
        assert!(matches!(
            decode(&mut buf, 16),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn max_frame_size_of_usize_max_does_not_overflow() {
        // Regression: `HEADER_LEN + len` overflowed when the limit was
        // usize::MAX and a peer announced a length near it.
        for announced in [u64::MAX, u64::MAX - 7] {
            let mut buf = BytesMut::from(&announced.to_be_bytes()[..]);
            match decode(&mut buf, usize::MAX) {
                Err(FrameError::TooLarge { .. }) => {}
                other => panic!("{announced}: {other:?}"),
            }
        }
        // The largest frame whose end can be addressed is only incomplete.
        let mut buf = BytesMut::from(&(u64::MAX - 8).to_be_bytes()[..]);
        assert!(matches!(
            decode(&mut buf, usize::MAX),
            Ok(Decoded::Incomplete { .. })
        ));
        let mut buf = BytesMut::from(&encode_frame(b"ok")[..]);
        assert_eq!(
            decode(&mut buf, usize::MAX).unwrap(),
            Decoded::Frame(Bytes::from_static(b"ok"))
        );
    }

    #[tokio::test]
    async fn waiting_with_a_usize_max_limit_does_not_overflow() {
        // Regression: `HEADER_LEN + self.max` overflowed in `closed()`.
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"early bytes").await.unwrap();
        drop(a);
        let mut c = Connection::new(b, usize::MAX);
        assert!(c.closed().await.is_ok());
        assert!(matches!(
            c.read_frame().await,
            Err(FrameError::Unsolicited { received: 11 })
        ));
    }

    #[tokio::test]
    async fn sending_past_a_whole_frame_while_waiting_is_reported() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0u8; 3000]).await.unwrap();
        let mut c = Connection::new(b, 1024);
        assert!(matches!(
            c.closed().await,
            Err(FrameError::Unsolicited { received }) if received > 1024 + HEADER_LEN
        ));
    }

    #[tokio::test]
    async fn waiting_on_a_peer_that_sends_a_large_frame_buffers_none_of_it() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            a.write_all(&encode_frame(&vec![7u8; 4 << 20]))
                .await
                .unwrap();
        });
        let mut c = Connection::new(b, 8 << 20);
        assert!(c.closed().await.is_ok(), "the peer left");
        assert!(
            c.buffered_capacity() < DISCARD_CHUNK,
            "{} bytes held",
            c.buffered_capacity()
        );
        assert!(
            matches!(c.read_header().await, Err(FrameError::Unsolicited { received }) if received == HEADER_LEN + (4 << 20)),
            "thrown away, not read as a frame"
        );
    }

    #[tokio::test]
    async fn a_discarded_frame_is_not_buffered() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut bytes = encode_frame(&vec![7u8; 4 << 20]);
        bytes.extend(encode_frame(b"next"));
        tokio::spawn(async move { a.write_all(&bytes).await.unwrap() });
        let mut c = Connection::new(b, 8 << 20);
        assert_eq!(c.read_header().await.unwrap(), Some(4 << 20));
        assert_eq!(c.discard_frame().await.unwrap(), 4 << 20);
        assert!(
            c.buffered_capacity() <= DISCARD_CHUNK,
            "{} bytes held",
            c.buffered_capacity()
        );
        assert_eq!(c.read_frame().await.unwrap().unwrap(), &b"next"[..]);
    }

    #[tokio::test]
    async fn reader_reassembles_frames_split_across_reads() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut bytes = encode_frame(&[1u8; 300]);
        bytes.extend(encode_frame(b"x"));
        tokio::spawn(async move {
            for chunk in bytes.chunks(7) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b, 1000);
        assert_eq!(r.read_frame().await.unwrap().unwrap(), vec![1u8; 300]);
        assert_eq!(r.read_frame().await.unwrap().unwrap(), &b"x"[..]);
        assert!(r.read_frame().await.unwrap().is_none(), "clean EOF");
    }

    #[tokio::test]
    async fn a_large_frame_takes_its_memory_with_it() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let big = vec![3u8; 3 * EAGER_RESERVE];
        tokio::spawn(async move {
            a.write_all(&encode_frame(&big)).await.unwrap();
            a.write_all(&encode_frame(b"small")).await.unwrap();
        });
        let mut r = FrameReader::new(b, 1 << 30);
        let frame = r.read_frame().await.unwrap().unwrap();
        assert_eq!(frame.len(), 3 * EAGER_RESERVE);
        drop(frame);
        assert_eq!(r.read_frame().await.unwrap().unwrap(), &b"small"[..]);
        assert!(
            r.buffered_capacity() < EAGER_RESERVE,
            "{}",
            r.buffered_capacity()
        );
    }

    /// A payload whose bytes say where they are, so a misplaced chunk
    /// shows.
    fn counting(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_large_frame_arrives_whole_in_a_mapping_of_its_own() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let big = counting(5 * MAPPED_MIN + 17);
        let mut bytes = encode_frame(&big);
        bytes.extend(encode_frame(b"after"));
        tokio::spawn(async move {
            for chunk in bytes.chunks(100_003) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b, 1 << 30);
        let frame = r.read_frame().await.unwrap().unwrap();
        assert!(frame == big, "the payload came out changed");
        assert!(crate::memory::mapped::is_mapped(&frame));
        assert_eq!(r.read_frame().await.unwrap().unwrap(), &b"after"[..]);
        assert!(r.read_frame().await.unwrap().is_none());
        assert!(r.buffered_capacity() < EAGER_RESERVE);
    }

    #[tokio::test]
    async fn a_large_frame_cut_off_is_an_error() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let bytes = encode_frame(&counting(2 * MAPPED_MIN));
        tokio::spawn(async move {
            a.write_all(&bytes[..MAPPED_MIN + 5]).await.unwrap();
        });
        let mut r = FrameReader::new(b, 1 << 30);
        assert!(matches!(r.read_frame().await, Err(FrameError::Truncated)));
    }

    #[tokio::test]
    async fn a_large_frame_half_read_can_still_be_discarded() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let len = 3 * MAPPED_MIN;
        let bytes = encode_frame(&counting(len));
        let (go, rest) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            a.write_all(&bytes[..2 * MAPPED_MIN]).await.unwrap();
            rest.await.unwrap();
            a.write_all(&bytes[2 * MAPPED_MIN..]).await.unwrap();
            a.write_all(&encode_frame(b"next")).await.unwrap();
        });
        let mut c = Connection::new(b, 1 << 30);
        let first = tokio::time::timeout(Duration::from_millis(100), c.read_frame()).await;
        assert!(first.is_err(), "the frame cannot be whole yet");
        assert_eq!(c.read_header().await.unwrap(), Some(len), "its header");
        go.send(()).unwrap();
        assert_eq!(c.discard_frame().await.unwrap(), len);
        assert_eq!(c.read_frame().await.unwrap().unwrap(), &b"next"[..]);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&encode_frame(b"abcdef")[..10]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, 1000);
        assert!(matches!(r.read_frame().await, Err(FrameError::Truncated)));
    }

    #[tokio::test]
    async fn write_frames_sends_frames_back_to_back() {
        let (mut a, b) = tokio::io::duplex(7);
        tokio::spawn(async move { write_frames(&mut a, &[b"", b"package"]).await.unwrap() });
        let mut r = FrameReader::new(b, 100);
        assert_eq!(r.read_frame().await.unwrap().unwrap(), &b""[..]);
        assert_eq!(r.read_frame().await.unwrap().unwrap(), &b"package"[..]);
        assert!(r.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_failed_write_says_nothing_was_written() {
        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let err = write_frames(&mut a, &[b"x", b"y"]).await.unwrap_err();
        assert_eq!(err.written, 0);
    }

    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        tokio::time::pause();
        let (a, _b) = tokio::io::duplex(64);
        let mut c = Connection::new(a, 1024);
        c.set_write_stall(Duration::from_secs(5));
        let err = c.write_frame(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_cut_off() {
        tokio::time::pause();
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Connection::new(a, 1024);
        c.set_write_stall(Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 64];
            loop {
                // Every read comes before the stall limit, the whole
                // transfer takes far longer.
                tokio::time::sleep(Duration::from_secs(4)).await;
                match b.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        c.write_frame(&[7u8; 1000]).await.unwrap();
        drop(c);
        assert_eq!(reader.await.unwrap(), encode_frame(&[7u8; 1000]));
    }

    #[tokio::test]
    async fn a_header_is_seen_before_its_payload_is_read() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut bytes = encode_frame(&[5u8; 100_000]);
        bytes.extend(encode_frame(b"next"));
        let mut c = Connection::new(b, 1 << 20);
        let writer = tokio::spawn(async move {
            a.write_all(&bytes).await.unwrap();
            a
        });
        assert_eq!(c.read_header().await.unwrap(), Some(100_000));
        assert_eq!(
            c.read_header().await.unwrap(),
            Some(100_000),
            "not consumed"
        );
        assert_eq!(c.discard_frame().await.unwrap(), 100_000);
        assert_eq!(c.read_header().await.unwrap(), Some(4));
        assert_eq!(c.read_frame().await.unwrap().unwrap(), &b"next"[..]);
        drop(writer.await.unwrap());
        assert_eq!(c.read_header().await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_oversize_header_is_refused_before_its_payload() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&(1u64 << 40).to_be_bytes()).await.unwrap();
        let mut c = Connection::new(b, 1024);
        assert!(matches!(
            c.read_header().await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn write_frame_round_trips() {
        let (mut a, b) = tokio::io::duplex(16);
        let payload = vec![9u8; 1000];
        let p2 = payload.clone();
        tokio::spawn(async move { write_frame(&mut a, &p2).await.unwrap() });
        let mut r = FrameReader::new(b, 1000);
        assert_eq!(r.read_frame().await.unwrap().unwrap(), payload);
    }
}
