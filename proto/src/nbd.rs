//! The NBD wire protocol (NetworkBlockDevice/nbd `doc/proto.md`), server side.
//!
//! Only codecs live here: byte layouts, constants and strict parsing with length bounds. The
//! I/O (sockets, the handshake loop, the request pipeline) lives in `blockrep::nbd_server`, so
//! this module can be unit-tested and fuzzed without a socket.

use thiserror::Error;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Errors (values fixed by the spec, same as Linux errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload we accept. Export names are at most 4096 bytes by the spec; a few
/// info requests on top fit easily. Anything bigger is hostile or broken.
pub const MAX_OPTION_LEN: u32 = 8192;
/// Largest option payload a server skips (answering `REP_ERR_TOO_BIG`) to stay in option
/// haggling; past it the connection is closed rather than read for ever.
pub const MAX_SKIPPED_OPTION_LEN: u32 = 1 << 20;
/// Largest payload of one request (the spec's default maximum block size). A client that sends
/// a bigger write cannot be resynchronised with, so such a connection is closed.
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Sizes of the fixed headers.
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Option header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NbdError {
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option {option} payload of {len} bytes exceeds the bound of {MAX_OPTION_LEN}")]
    OptionTooLong { option: u32, len: u32 },
    #[error("malformed option {option}: {why}")]
    MalformedOption { option: u32, why: &'static str },
    #[error("bad request magic {0:#x}")]
    BadRequestMagic(u32),
    #[error("request length {0} exceeds the bound of {MAX_REQUEST_LEN}")]
    RequestTooLong(u32),
    #[error("client flags {0:#x} lack FIXED_NEWSTYLE or carry unknown bits")]
    BadClientFlags(u32),
}

/// Checks the client's 4-byte flags sent right after the server greeting.
/// Returns whether the client asked for NO_ZEROES.
pub fn parse_client_flags(flags: u32) -> Result<bool, NbdError> {
    if flags & FLAG_C_FIXED_NEWSTYLE == 0
        || flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
    {
        return Err(NbdError::BadClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// The 18-byte greeting of the fixed newstyle handshake.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Parses a 16-byte option header into (option, payload length), bounding the length.
pub fn parse_option_header(h: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), NbdError> {
    let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(NbdError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    if len > MAX_OPTION_LEN {
        return Err(NbdError::OptionTooLong { option, len });
    }
    Ok((option, len))
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses the payload of INFO/GO: u32 name length, name, u16 count, count × u16.
pub fn parse_info_request(option: u32, data: &[u8]) -> Result<InfoRequest, NbdError> {
    let bad = |why| NbdError::MalformedOption { option, why };
    if data.len() < 6 {
        return Err(bad("shorter than its fixed fields"));
    }
    let name_len = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
    let rest = &data[4..];
    if name_len > rest.len().saturating_sub(2) {
        return Err(bad("name length runs past the payload"));
    }
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| bad("export name is not UTF-8"))?
        .to_owned();
    let rest = &rest[name_len..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err(bad("info request count does not match the payload"));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// Appends one option reply (header + payload).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    // An error's message is at most 4096 bytes (the spec's bound on error strings): one that
    // quotes what the client sent is cut, on a character boundary.
    let data = if reply_type & (1 << 31) != 0 && data.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        if let Ok(text) = std::str::from_utf8(data) {
            while !text.is_char_boundary(end) {
                end -= 1;
            }
        }
        &data[..end]
    } else {
        data
    };
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Longest error message in an option reply or an error chunk.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// `NBD_REP_INFO` carrying `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size.to_be_bytes());
    d[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
}

/// `NBD_REP_INFO` carrying `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, pref: u32, max: u32) {
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&min.to_be_bytes());
    d[6..10].copy_from_slice(&pref.to_be_bytes());
    d[10..14].copy_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
}

/// `NBD_REP_INFO` carrying `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn encode_info_text(out: &mut Vec<u8>, option: u32, info: u16, text: &str) {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
}

/// `NBD_REP_SERVER` for `NBD_OPT_LIST`.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &d);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless NO_ZEROES) 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Transmission-phase commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Unknown command type: answered EINVAL, never guessed at.
    Other(u16),
}

impl Command {
    fn from_u16(v: u16) -> Self {
        match v {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            x => Self::Other(x),
        }
    }

    /// Whether the command changes the device (or, for a flush, commits changes): what a node
    /// that no longer serves I/O must refuse even for a request already read.
    pub fn modifies(self) -> bool {
        matches!(
            self,
            Self::Write | Self::Trim | Self::WriteZeroes | Self::Flush
        )
    }
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parses the 28-byte header. A payload-bearing request whose length is above the bound is
    /// an error (the stream cannot be trusted after it); other lengths are checked by the caller
    /// against the export.
    pub fn parse(h: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, NbdError> {
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadRequestMagic(magic));
        }
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let command = Command::from_u16(u16::from_be_bytes([h[6], h[7]]));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
        let length = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes"));
        if command == Command::Write && length > MAX_REQUEST_LEN {
            return Err(NbdError::RequestTooLong(length));
        }
        Ok(Self {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let ty: u16 = match self.command {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Other(x) => x,
        };
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Whether the request range lies inside an export of `size` bytes (no overflow).
    pub fn in_bounds(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size)
    }

    /// The spec's error for a request past the end: ENOSPC for writes, EINVAL otherwise.
    pub fn out_of_bounds_error(&self) -> u32 {
        match self.command {
            Command::Write | Command::WriteZeroes => ENOSPC,
            _ => EINVAL,
        }
    }
}

/// A simple reply header; read data (if any) follows it.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The final `NBD_REPLY_TYPE_NONE` chunk of a successful non-read command.
pub fn encode_structured_done(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of data follow.
/// `done`: the last chunk of the reply (a read longer than the advertised maximum payload is
/// sent in several chunks: the spec bounds every chunk's data by it).
pub fn encode_structured_read_header(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    encode_chunk_header(
        out,
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + data_len,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message.
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, msg: &str) {
    let mut end = msg.len().min(MAX_ERROR_MESSAGE);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg.as_bytes()[..end];
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0xdead_beef,
            offset: 4096,
            length: 512,
        };
        let mut b = Vec::new();
        r.encode(&mut b);
        assert_eq!(b.len(), REQUEST_HEADER_LEN);
        let h: [u8; REQUEST_HEADER_LEN] = b.try_into().unwrap();
        assert_eq!(Request::parse(&h).unwrap(), r);
    }

    #[test]
    fn request_bad_magic_and_oversize_rejected() {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        assert!(matches!(
            Request::parse(&h),
            Err(NbdError::BadRequestMagic(0))
        ));
        let r = Request {
            flags: 0,
            command: Command::Write,
            cookie: 1,
            offset: 0,
            length: MAX_REQUEST_LEN + 1,
        };
        let mut b = Vec::new();
        r.encode(&mut b);
        h.copy_from_slice(&b);
        assert_eq!(
            Request::parse(&h),
            Err(NbdError::RequestTooLong(MAX_REQUEST_LEN + 1))
        );
        // A read of the same size is not a framing error: the caller answers it.
        h[7] = 0;
        assert!(Request::parse(&h).is_ok());
    }

    #[test]
    fn bounds_do_not_overflow() {
        let r = Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: u64::MAX - 10,
            length: 100,
        };
        assert!(!r.in_bounds(u64::MAX));
        assert_eq!(r.out_of_bounds_error(), EINVAL);
        let w = Request {
            command: Command::Write,
            offset: 4096,
            length: 4096,
            ..r
        };
        assert!(w.in_bounds(8192));
        assert!(!w.in_bounds(8191));
        assert_eq!(w.out_of_bounds_error(), ENOSPC);
    }

    #[test]
    fn option_header_bounds() {
        let mut h = [0u8; OPTION_HEADER_LEN];
        h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(parse_option_header(&h).unwrap(), (OPT_GO, 10));
        h[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&h),
            Err(NbdError::OptionTooLong { .. })
        ));
        h[0] = 0;
        assert!(matches!(
            parse_option_header(&h),
            Err(NbdError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn info_request_parsing_is_strict() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"res");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(OPT_GO, &d).unwrap();
        assert_eq!(r.name, "res");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Count says 2 but only one is present.
        assert!(parse_info_request(OPT_GO, &d[..d.len() - 2]).is_err());
        // Name length past the end.
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_info_request(OPT_GO, &bad).is_err());
        assert!(parse_info_request(OPT_GO, &[0, 0]).is_err());
        // Every truncation is an error, never a panic.
        for n in 0..d.len() {
            let _ = parse_info_request(OPT_GO, &d[..n]);
        }
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(1), Ok(false));
        assert_eq!(parse_client_flags(3), Ok(true));
        assert!(parse_client_flags(0).is_err());
        assert!(parse_client_flags(5).is_err());
    }

    #[test]
    fn error_messages_are_cut_to_the_spec_bound_on_a_character_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        let mut b = Vec::new();
        encode_option_reply(&mut b, 7, REP_ERR_UNKNOWN, long.as_bytes());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        assert_eq!(len, 4096);
        assert!(std::str::from_utf8(&b[20..]).is_ok());
        // Not an error: as given.
        b.clear();
        encode_option_reply(&mut b, 7, REP_ACK, long.as_bytes());
        assert_eq!(b.len(), 20 + long.len());
        b.clear();
        encode_structured_error(&mut b, 7, EIO, &long);
        let n = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert_eq!(n, 4096);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
    }

    #[test]
    fn structured_chunks_have_right_lengths() {
        let mut b = Vec::new();
        encode_structured_read_header(&mut b, 7, 4096, 512, true);
        assert_eq!(b.len(), STRUCTURED_REPLY_HEADER_LEN + 8);
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 520);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), REPLY_FLAG_DONE);
        b.clear();
        encode_structured_read_header(&mut b, 7, 4096, 512, false);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 0);
        b.clear();
        encode_structured_error(&mut b, 7, EIO, "boom");
        assert_eq!(b.len(), STRUCTURED_REPLY_HEADER_LEN + 6 + 4);
    }
}
