//! The byte stream of an established peer connection: plain TCP, or sealed records
//! ([`proto::seal`]) when the resource sets `encryption`.
//!
//! The peer code reads and writes frames through [`LinkRead`] and [`LinkWrite`] and never sees
//! which one it has. A sealed write is on the socket (in the kernel's buffer) when
//! `poll_write` returns, like a plain one, so no caller needs an explicit flush.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use proto::seal::{Opener, Sealer, MAX_RECORD, PREFIX};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The keys of one connection: what this node seals with and what it opens with.
pub struct LinkKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
}

/// Splits a connected socket into the link's halves, sealed when `keys` are given.
pub fn split(stream: tokio::net::TcpStream, keys: Option<LinkKeys>) -> (LinkRead, LinkWrite) {
    let (rd, wr) = stream.into_split();
    match keys {
        None => (LinkRead::Plain(rd), LinkWrite::Plain(wr)),
        Some(k) => (
            LinkRead::Sealed(Box::new(SealedRead {
                inner: rd,
                opener: Opener::new(&k.recv),
                rec: Vec::new(),
                in_body: false,
                want: 0,
                have: 0,
                plain: 0..0,
            })),
            LinkWrite::Sealed(Box::new(SealedWrite {
                inner: wr,
                sealer: Sealer::new(&k.send),
                out: Vec::new(),
                sent: 0,
                accepted: 0,
            })),
        ),
    }
}

pub enum LinkRead {
    Plain(OwnedReadHalf),
    Sealed(Box<SealedRead>),
}

pub enum LinkWrite {
    Plain(OwnedWriteHalf),
    Sealed(Box<SealedWrite>),
}

impl LinkWrite {
    pub fn is_sealed(&self) -> bool {
        matches!(self, LinkWrite::Sealed(_))
    }
}

/// Reads records, opens them in place and hands out their plaintext.
pub struct SealedRead {
    inner: OwnedReadHalf,
    opener: Opener,
    /// The record being read (body: ciphertext and tag), then its plaintext.
    rec: Vec<u8>,
    /// Reading the current record's body (else its length prefix).
    in_body: bool,
    /// Bytes of `rec` to fill, and filled so far (0 and 0 between records).
    want: usize,
    have: usize,
    /// The opened plaintext not yet handed out.
    plain: std::ops::Range<usize>,
}

/// The sealing error inside (see [`sealing_error`]).
fn broken(e: proto::seal::SealError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The sealing error an I/O error of a sealed link carries, if any.
pub fn sealing_error(e: &io::Error) -> Option<&proto::seal::SealError> {
    e.get_ref()?.downcast_ref()
}

impl SealedRead {
    /// Reads into `rec[have..want]`; `Ready(Ok(false))` on a clean end of stream at a record
    /// boundary.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.have < self.want {
            let mut rb = ReadBuf::new(&mut self.rec[self.have..self.want]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                if self.have == 0 && !self.in_body {
                    return Poll::Ready(Ok(false));
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            self.have += n;
        }
        Poll::Ready(Ok(true))
    }

    /// Makes the next record's plaintext available; `Ok(false)` at the end of the stream.
    fn next_record(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.in_body {
            if self.want == 0 {
                self.rec.resize(PREFIX, 0);
                self.want = PREFIX;
                self.have = 0;
            }
            if !ready!(self.fill(cx))? {
                return Poll::Ready(Ok(false));
            }
            let mut p = [0u8; PREFIX];
            p.copy_from_slice(&self.rec[..PREFIX]);
            // Bounded (at most MAX_RECORD plus the tag) before the buffer grows.
            let body = Opener::body_len(p).map_err(broken)?;
            self.rec.resize(body, 0);
            self.in_body = true;
            self.want = body;
            self.have = 0;
        }
        ready!(self.fill(cx))?;
        let n = self.opener.open_in_place(&mut self.rec).map_err(broken)?;
        self.plain = 0..n;
        self.in_body = false;
        self.want = 0;
        Poll::Ready(Ok(true))
    }
}

impl AsyncRead for LinkRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            LinkRead::Sealed(s) => {
                // Empty records (a batch of nothing) are legal: keep going until bytes come.
                while s.plain.is_empty() {
                    if !ready!(s.next_record(cx))? {
                        return Poll::Ready(Ok(()));
                    }
                }
                let n = s.plain.len().min(buf.remaining());
                let start = s.plain.start;
                buf.put_slice(&s.rec[start..start + n]);
                s.plain.start += n;
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// Seals what it is given into one record per write call and puts it on the socket before
/// reporting the bytes written.
pub struct SealedWrite {
    inner: OwnedWriteHalf,
    sealer: Sealer,
    /// The sealed record being written.
    out: Vec<u8>,
    sent: usize,
    /// Plaintext bytes the record in `out` carries: reported once it is all sent.
    accepted: usize,
}

impl SealedWrite {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        let n = self.accepted;
        self.out.clear();
        self.sent = 0;
        self.accepted = 0;
        Poll::Ready(Ok(n))
    }

    /// Seals `parts` (at most [`MAX_RECORD`] bytes in all are taken) as one record, unless
    /// one is still being written: then that one finishes first (the caller retries with the
    /// same bytes, as `write_all` does).
    fn poll_parts(&mut self, cx: &mut Context<'_>, parts: &[&[u8]]) -> Poll<io::Result<usize>> {
        if self.out.is_empty() {
            let take = if let [one] = parts {
                let n = one.len().min(MAX_RECORD);
                self.sealer
                    .seal_into(&one[..n], &mut self.out)
                    .map_err(broken)?;
                n
            } else {
                let mut plain = Vec::new();
                for p in parts {
                    let room = MAX_RECORD - plain.len();
                    plain.extend_from_slice(&p[..p.len().min(room)]);
                }
                self.sealer
                    .seal_into(&plain, &mut self.out)
                    .map_err(broken)?;
                plain.len()
            };
            if take == 0 {
                // Nothing to send: no empty record on the wire.
                self.out.clear();
                return Poll::Ready(Ok(0));
            }
            self.accepted = take;
        }
        self.drain(cx)
    }
}

impl AsyncWrite for LinkWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            LinkWrite::Sealed(s) => s.poll_parts(cx, &[buf]),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            LinkWrite::Sealed(s) => {
                let parts: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
                s.poll_parts(cx, &parts)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            LinkWrite::Sealed(s) => {
                ready!(s.drain(cx))?;
                Pin::new(&mut s.inner).poll_flush(cx)
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            LinkWrite::Sealed(s) => {
                ready!(s.drain(cx))?;
                Pin::new(&mut s.inner).poll_shutdown(cx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(keys: bool) -> ((LinkRead, LinkWrite), (LinkRead, LinkWrite)) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let k = |x: u8, y: u8| {
            keys.then_some(LinkKeys {
                send: [x; 32],
                recv: [y; 32],
            })
        };
        (split(a.unwrap(), k(1, 2)), split(b.unwrap().0, k(2, 1)))
    }

    #[tokio::test]
    async fn sealed_stream_carries_bytes_both_ways() {
        for sealed in [false, true] {
            let ((mut ar, mut aw), (mut br, mut bw)) = pair(sealed).await;
            assert_eq!(aw.is_sealed(), sealed);
            let big: Vec<u8> = (0..(MAX_RECORD * 2 + 12345)).map(|i| i as u8).collect();
            let send = big.clone();
            let w = tokio::spawn(async move {
                aw.write_all(b"hello").await.unwrap();
                aw.write_all(&send).await.unwrap();
                let parts = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
                let n = aw.write_vectored(&parts).await.unwrap();
                assert_eq!(n, 4);
                aw
            });
            let mut got = vec![0u8; 5 + big.len() + 4];
            br.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..5], b"hello");
            assert_eq!(&got[5..5 + big.len()], &big[..]);
            assert_eq!(&got[5 + big.len()..], b"abcd");
            drop(w.await.unwrap());
            // The other direction, then a clean end of stream.
            bw.write_all(b"back").await.unwrap();
            drop(bw);
            let mut v = Vec::new();
            ar.read_to_end(&mut v).await.unwrap();
            assert_eq!(v, b"back");
        }
    }

    #[tokio::test]
    async fn wrong_key_or_garbage_is_an_error_not_a_panic() {
        let ((_ar, aw), (mut br, _bw)) = pair(true).await;
        // Replace alpha's writer with one sealing under another key.
        let LinkWrite::Sealed(mut s) = aw else {
            unreachable!()
        };
        s.sealer = Sealer::new(&[9; 32]);
        let mut aw = LinkWrite::Sealed(s);
        aw.write_all(b"forged").await.unwrap();
        let mut b = [0u8; 6];
        let e = br.read_exact(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        // A huge announced length is refused before any allocation.
        let ((_ar, aw), (mut br, _bw)) = pair(true).await;
        let LinkWrite::Sealed(mut s) = aw else {
            unreachable!()
        };
        s.inner.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let e = br.read_exact(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
