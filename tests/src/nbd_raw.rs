//! A hand-written NBD client (fixed newstyle, simple replies only) for protocol-level tests,
//! including hostile ones. Written from the protocol document, independently of the server's
//! codec, so both do not share a bug. Every read has a timeout: a server that stops
//! answering makes the test fail instead of hang.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::cluster::Export;

/// Protocol constants (values from the NBD protocol document).
pub mod nbd_const {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const CFLAG_FIXED_NEWSTYLE: u32 = 1;
    pub const CFLAG_NO_ZEROES: u32 = 2;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;

    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
    pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
    pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
    pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
    pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const TFLAG_HAS_FLAGS: u16 = 1;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_FUA: u16 = 1 << 3;
    pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_FLAG_FUA: u16 = 1;

    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
}

use nbd_const::*;

trait Stream: Read + Write + Send {
    fn shutdown_write(&self);
    fn read_timeout(&self, d: Duration);
}
impl Stream for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn read_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
}
impl Stream for UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn read_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
}

/// One option reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
    /// The payload as text (error replies carry a message).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A raw NBD connection.
pub struct RawNbd {
    s: Box<dyn Stream>,
    cookie: u64,
    /// Export size and transmission flags once in the transmission phase.
    pub size: u64,
    pub flags: u16,
}

/// Per-read timeout of a raw connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

impl RawNbd {
    /// Connects (TCP or unix socket) with read/write timeouts set.
    pub fn connect(export: &Export) -> io::Result<Self> {
        let s: Box<dyn Stream> = match export {
            Export::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Export::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Box::new(s)
            }
        };
        Ok(Self {
            s,
            cookie: 0,
            size: 0,
            flags: 0,
        })
    }

    /// Sends raw bytes.
    pub fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)?;
        self.s.flush()
    }

    /// Sets the per-read timeout (a reply a test expects to be held for longer than
    /// [`IO_TIMEOUT`]).
    pub fn set_read_timeout(&self, d: Duration) {
        self.s.read_timeout(d);
    }

    /// Reads exactly `n` bytes.
    pub fn recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    fn recv_u16(&mut self) -> io::Result<u16> {
        let b = self.recv(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn recv_u32(&mut self) -> io::Result<u32> {
        let b = self.recv(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4")))
    }
    fn recv_u64(&mut self) -> io::Result<u64> {
        let b = self.recv(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8")))
    }

    /// Reads the 18-byte greeting; panics unless it is a fixed-newstyle greeting. Returns the
    /// handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let magic = self.recv_u64().expect("greeting: NBDMAGIC");
        assert_eq!(magic, NBDMAGIC, "greeting: bad NBDMAGIC {magic:#x}");
        let opt = self.recv_u64().expect("greeting: IHAVEOPT");
        assert_eq!(opt, IHAVEOPT, "greeting: not newstyle ({opt:#x})");
        let flags = self.recv_u16().expect("greeting: flags");
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed-newstyle: {flags:#x}"
        );
        flags
    }

    /// Greeting + client flags (FIXED_NEWSTYLE | NO_ZEROES if offered).
    pub fn start_handshake(&mut self) {
        let flags = self.read_greeting();
        let mut c = CFLAG_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            c |= CFLAG_NO_ZEROES;
        }
        self.send(&c.to_be_bytes()).expect("send client flags");
    }

    /// Sends one option (header + payload).
    pub fn send_option(&mut self, option: u32, payload: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + payload.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// Reads one option reply (bounded: a payload over 64 KiB is a protocol error).
    pub fn read_option_reply(&mut self) -> io::Result<Reply> {
        let magic = self.recv_u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        let option = self.recv_u32()?;
        let reply_type = self.recv_u32()?;
        let len = self.recv_u32()?;
        if len > 65536 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option reply of {len} bytes"),
            ));
        }
        let data = self.recv(len as usize)?;
        Ok(Reply {
            option,
            reply_type,
            data,
        })
    }

    /// The payload of NBD_OPT_GO / NBD_OPT_INFO for `name` with no info requests.
    pub fn go_payload(name: &str) -> Vec<u8> {
        Self::go_payload_with(name, &[])
    }

    /// NBD_OPT_GO's payload asking for the info types in `requests`.
    pub fn go_payload_with(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            p.extend_from_slice(&r.to_be_bytes());
        }
        p
    }

    /// Sends NBD_OPT_GO and reads replies up to the final one. On ACK, records size and
    /// flags and returns Ok; on an error reply returns it.
    pub fn opt_go(&mut self, name: &str) -> Result<(u64, u16), Reply> {
        self.opt_go_with(name, &[])
    }

    /// [`Self::opt_go`], asking for the info types in `requests`.
    pub fn opt_go_with(&mut self, name: &str, requests: &[u16]) -> Result<(u64, u16), Reply> {
        self.send_option(OPT_GO, &Self::go_payload_with(name, requests))
            .expect("send NBD_OPT_GO");
        let mut got_export = None;
        loop {
            let r = self.read_option_reply().expect("read NBD_OPT_GO reply");
            assert_eq!(r.option, OPT_GO, "reply to the wrong option: {r:?}");
            if r.is_error() {
                return Err(r);
            }
            match r.reply_type {
                REP_INFO => {
                    assert!(r.data.len() >= 2, "short NBD_REP_INFO: {r:?}");
                    let ty = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if ty == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "bad NBD_INFO_EXPORT length: {r:?}");
                        let size = u64::from_be_bytes(r.data[2..10].try_into().expect("8"));
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        got_export = Some((size, flags));
                    }
                }
                REP_ACK => {
                    let (size, flags) =
                        got_export.expect("NBD_REP_ACK to GO without NBD_INFO_EXPORT first");
                    self.size = size;
                    self.flags = flags;
                    return Ok((size, flags));
                }
                other => panic!("unexpected reply type {other:#x} to NBD_OPT_GO"),
            }
        }
    }

    /// [`Self::open`], asking for the block size (which a direct-io export requires).
    pub fn open_with_block_size(export: &Export, name: &str) -> Self {
        let mut c = Self::connect(export).unwrap_or_else(|e| panic!("connect {export:?}: {e}"));
        c.start_handshake();
        if let Err(r) = c.opt_go_with(name, &[INFO_BLOCK_SIZE]) {
            panic!(
                "NBD_OPT_GO {name:?} refused: type {:#x}, {:?}",
                r.reply_type,
                r.text()
            );
        }
        c
    }

    /// Connects and completes the handshake with NBD_OPT_GO; panics on any failure.
    pub fn open(export: &Export, name: &str) -> Self {
        let mut c = Self::connect(export).unwrap_or_else(|e| panic!("connect {export:?}: {e}"));
        c.start_handshake();
        if let Err(r) = c.opt_go(name) {
            panic!(
                "NBD_OPT_GO {name:?} refused: type {:#x}, {:?}",
                r.reply_type,
                r.text()
            );
        }
        c
    }

    /// Sends a request header (and `payload`, for writes). Returns the cookie used.
    pub fn send_request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.cookie += 1;
        let cookie = self.cookie;
        self.send_request_raw(REQUEST_MAGIC, cmd, flags, cookie, offset, length, payload)?;
        Ok(cookie)
    }

    /// Sends an arbitrary request header (any magic) plus payload.
    #[allow(clippy::too_many_arguments)]
    pub fn send_request_raw(
        &mut self,
        magic: u32,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// Reads a simple reply header: (error, cookie). Panics on a bad magic.
    pub fn read_simple_reply(&mut self) -> io::Result<(u32, u64)> {
        let magic = self.recv_u32()?;
        assert_eq!(
            magic, SIMPLE_REPLY_MAGIC,
            "expected a simple reply (no structured replies were negotiated), got magic {magic:#x}"
        );
        let error = self.recv_u32()?;
        let cookie = self.recv_u64()?;
        Ok((error, cookie))
    }

    /// NBD_CMD_READ; `Err(errno)` on an error reply.
    pub fn read_at(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let cookie = self
            .send_request(CMD_READ, 0, offset, len, &[])
            .expect("send READ");
        let (err, c) = self.read_simple_reply().expect("READ reply");
        assert_eq!(c, cookie, "reply cookie mismatch");
        if err != 0 {
            return Err(err);
        }
        Ok(self.recv(len as usize).expect("READ data"))
    }

    /// NBD_CMD_WRITE; `Err(errno)` on an error reply.
    pub fn write_at(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        let cookie = self
            .send_request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .expect("send WRITE");
        let (err, c) = self.read_simple_reply().expect("WRITE reply");
        assert_eq!(c, cookie, "reply cookie mismatch");
        if err != 0 {
            return Err(err);
        }
        Ok(())
    }

    /// A data-less command (FLUSH, TRIM, WRITE_ZEROES); `Err(errno)` on an error reply.
    pub fn command(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> Result<(), u32> {
        let cookie = self
            .send_request(cmd, flags, offset, len, &[])
            .expect("send command");
        let (err, c) = self.read_simple_reply().expect("command reply");
        assert_eq!(c, cookie, "reply cookie mismatch");
        if err != 0 {
            return Err(err);
        }
        Ok(())
    }

    /// NBD_CMD_DISC then close.
    pub fn disconnect(mut self) {
        let _ = self.send_request(CMD_DISC, 0, 0, 0, &[]);
        self.s.shutdown_write();
    }

    /// Reads and discards until the server closes the connection (EOF or reset). Returns
    /// the bytes received before, or `Err` (with them) if the connection is still open after
    /// `timeout`.
    /// After a refused NBD_OPT_GO: the server still haggles (the spec lets it hang up only
    /// where it cannot answer), so the client ends it with NBD_OPT_ABORT, acknowledged
    /// before the close. Panics otherwise.
    pub fn abort_after_refusal(&mut self) {
        assert!(
            self.expect_closed(Duration::from_millis(500)).is_err(),
            "the server hung up after refusing NBD_OPT_GO"
        );
        self.send_option(OPT_ABORT, &[]).expect("send ABORT");
        let ack = self.read_option_reply().expect("ABORT's reply");
        assert_eq!(ack.reply_type, REP_ACK, "{:?}", ack.text());
        self.expect_closed(Duration::from_secs(5))
            .expect("connection must be closed after the abort");
    }

    pub fn expect_closed(&mut self, timeout: Duration) -> Result<Vec<u8>, Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        self.s.read_timeout(Duration::from_millis(100));
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => {
                    if got.len() < 1 << 20 {
                        got.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNRESET and the like: closed.
                Err(_) => return Ok(got),
            }
            if Instant::now() >= deadline {
                self.s.read_timeout(IO_TIMEOUT);
                return Err(got);
            }
        }
    }

    /// Half-closes the connection (no more data from us).
    pub fn shutdown_write(&self) {
        self.s.shutdown_write();
    }
}
