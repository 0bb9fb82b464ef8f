//! The client's errors: what ends a connection, what fails one request,
//! and why a request is refused before it is queued.

use crate::wire::*;

/// Why the server refused an option (its `NBD_REP_ERR_*` reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdOptionRefusal {
    /// `NBD_REP_ERR_UNSUP`: the server does not know the option.
    Unsupported,
    /// `NBD_REP_ERR_POLICY`: the server's policy forbids it.
    Policy,
    /// `NBD_REP_ERR_INVALID`: the server found the option malformed.
    Invalid,
    /// `NBD_REP_ERR_PLATFORM`: not available on the server's platform.
    Platform,
    /// `NBD_REP_ERR_TLS_REQD`: the server wants TLS first (not supported here).
    TlsRequired,
    /// `NBD_REP_ERR_UNKNOWN`: no export of that name.
    UnknownExport,
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    ShuttingDown,
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the server insists on block size negotiation.
    BlockSizeRequired,
    /// `NBD_REP_ERR_TOO_BIG`: the request or reply would be too large.
    TooBig,
    /// Another error reply type (bit 31 set), by number.
    Other(u32),
}

impl NbdOptionRefusal {
    /// The refusal an error reply type stands for.
    pub fn from_reply_type(reply: u32) -> Self {
        match reply {
            NBD_REP_ERR_UNSUP => Self::Unsupported,
            NBD_REP_ERR_POLICY => Self::Policy,
            NBD_REP_ERR_INVALID => Self::Invalid,
            NBD_REP_ERR_PLATFORM => Self::Platform,
            NBD_REP_ERR_TLS_REQD => Self::TlsRequired,
            NBD_REP_ERR_UNKNOWN => Self::UnknownExport,
            NBD_REP_ERR_SHUTDOWN => Self::ShuttingDown,
            NBD_REP_ERR_BLOCK_SIZE_REQD => Self::BlockSizeRequired,
            NBD_REP_ERR_TOO_BIG => Self::TooBig,
            other => Self::Other(other),
        }
    }
}

/// An error in a request's reply, as the server reported it (errno values
/// of the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdServerError {
    /// `EPERM`: not permitted (e.g. a write to a read-only export).
    NotPermitted,
    /// `EIO`: the server's storage failed.
    Io,
    /// `ENOMEM`: the server ran out of memory.
    NoMemory,
    /// `EINVAL`: the server found the request invalid.
    Invalid,
    /// `ENOSPC`: no space left on the server's storage.
    NoSpace,
    /// `EOVERFLOW`: the request was too large for the server.
    Overflow,
    /// `ENOTSUP`: the server does not support the request.
    NotSupported,
    /// Another value (the protocol maps unknown errors to `EINVAL`; the
    /// number is kept for diagnostics).
    Other(u32),
}

impl NbdServerError {
    /// The error a reply's error field stands for (`ESHUTDOWN` is handled
    /// before this, as the end of the connection).
    pub fn from_wire(error: u32) -> Self {
        match error {
            NBD_EPERM => Self::NotPermitted,
            NBD_EIO => Self::Io,
            NBD_ENOMEM => Self::NoMemory,
            NBD_EINVAL => Self::Invalid,
            NBD_ENOSPC => Self::NoSpace,
            NBD_EOVERFLOW => Self::Overflow,
            NBD_ENOTSUP => Self::NotSupported,
            other => Self::Other(other),
        }
    }
}

/// What ends a connection. The client has already put every request that
/// had no complete reply back in the queue; the caller closes the
/// connection and may open another (after its own backoff).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdConnectionError {
    /// Bytes arrived while no connection was started (a caller bug).
    NotConnected,
    /// The greeting did not start with `NBDMAGIC` `IHAVEOPT`.
    BadGreetingMagic(u64),
    /// The server speaks oldstyle negotiation, which this client does not.
    OldstyleServer,
    /// An option reply did not start with the option reply magic.
    BadOptionReplyMagic(u64),
    /// An option reply answered another option than the one sent.
    OptionReplyMismatch {
        /// The option the client is waiting on.
        sent: u32,
        /// The option the reply names.
        answered: u32,
    },
    /// An option reply of a type that makes no sense for the option.
    UnexpectedOptionReply {
        /// The option.
        option: u32,
        /// The reply type.
        reply: u32,
    },
    /// An option reply longer than anything the client asked for needs.
    OversizedOptionReply(u32),
    /// An `NBD_REP_INFO` reply of the wrong length for its type.
    BadInfoLength {
        /// The information type.
        info: u16,
        /// Its length.
        len: u32,
    },
    /// The server refused an option the connection cannot do without.
    Refused {
        /// The option.
        option: u32,
        /// The server's reason.
        refusal: NbdOptionRefusal,
    },
    /// `NBD_OPT_GO` was acknowledged without `NBD_INFO_EXPORT`.
    MissingExportInfo,
    /// Block size constraints that break the protocol's rules.
    BadBlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        maximum: u32,
    },
    /// Transmission flags without `NBD_FLAG_HAS_FLAGS`.
    BadTransmissionFlags(u16),
    /// The export's size differs from the first connection's: the client
    /// has failed every request and takes no more.
    ExportSizeChanged {
        /// The size at the first connection.
        was: u64,
        /// The size the server reports now.
        now: u64,
    },
    /// A reply did not start with a known reply magic.
    BadReplyMagic(u32),
    /// A reply named a cookie that is not in flight.
    UnknownCookie(u64),
    /// A simple reply to a read after structured replies were negotiated,
    /// or a structured chunk when they were not.
    WrongReplyKind(u64),
    /// A structured chunk of a type or length the request cannot have.
    BadChunk {
        /// The request's cookie.
        cookie: u64,
        /// The chunk type.
        chunk_type: u16,
        /// The chunk's payload length.
        len: u32,
    },
    /// A data or hole chunk outside its read's range, or chunks covering
    /// more bytes than the read.
    ChunkOutOfRange(u64),
    /// A successful structured read reply that did not cover the read.
    IncompleteRead(u64),
    /// The server reported `ESHUTDOWN`: it is going away; the request is
    /// replayed on the next connection.
    ServerShuttingDown,
}

/// Why a request failed (its completion's error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdRequestError {
    /// The server answered with an error.
    Server(NbdServerError),
    /// No complete reply came before the request's deadline.
    TimedOut,
    /// The export's size changed across a reconnect; the data may not be
    /// the same disk any more.
    ExportSizeChanged,
}

/// Why a request was refused before it was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdSubmitError {
    /// No handshake has completed yet: the export's size and flags are unknown.
    NotConnected,
    /// Every slot of the in-flight table is taken (or its completion not yet collected).
    Full,
    /// The export is read-only.
    ReadOnly,
    /// The server did not offer the command or flag.
    NotSupported,
    /// The range ends past the export's end.
    OutOfRange,
    /// The range is not a multiple of the server's minimum block size.
    Misaligned,
    /// A read or write of more bytes than the server or the configuration allows, or of none.
    BadLength,
    /// The client is disconnecting or has failed.
    Closed,
}
