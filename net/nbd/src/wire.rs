//! NBD wire constants (doc/proto.md of the NetworkBlockDevice/nbd project)
//! and the big-endian field readers the parser uses.

/// "NBDMAGIC": the first 8 bytes a server sends.
pub const NBD_INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting and every option the client sends.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second magic (not supported).
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Every option reply starts with this.
pub const NBD_OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Every request starts with this.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// A simple reply starts with this.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// A structured reply chunk starts with this.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_INFO: u32 = 3;
/// Option replies with this bit set are refusals.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;

pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk types with this bit set carry an error.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The longest string (export name, error message) the protocol allows.
pub const NBD_MAX_STRING: usize = 4096;

/// Size of a request header on the wire.
pub const NBD_REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const NBD_SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header on the wire.
pub const NBD_CHUNK_HEADER_LEN: usize = 20;

pub fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

pub fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// One request header: what the client sends before a write's payload.
pub fn encode_request(
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; NBD_REQUEST_LEN] {
    let mut header = [0; NBD_REQUEST_LEN];
    header[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..24].copy_from_slice(&offset.to_be_bytes());
    header[24..28].copy_from_slice(&len.to_be_bytes());
    header
}
