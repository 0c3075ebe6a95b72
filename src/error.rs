//! One error type for every node, classified by what the caller should do:
//! fix its input (rejected), try again later (retryable), or stop trusting
//! this node (fatal: storage failed; the node stops acknowledging, it never
//! guesses). One `From` turns it into a `tonic::Status` with a message.

use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The request is malformed or breaks a rule; it changed nothing.
    #[error("{0}")]
    InvalidInput(String),
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request would create something that exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request cannot apply to the state it names (an id reused with
    /// other parameters); it changed nothing, and retrying gives the same.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request conflicts with one in flight; retry later.
    #[error("{0}")]
    Conflict(String),
    /// A peer or this node cannot serve now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bounded queue is full; retry later.
    #[error("{0}")]
    Busy(String),
    /// The deadline passed before the work was done.
    #[error("{0}")]
    Timeout(String),
    /// An exact answer does not fit the field that would carry it (a total
    /// beyond an int64); nothing was changed, and retrying gives the same.
    #[error("{0}")]
    OutOfRange(String),
    /// Storage failed or is corrupt. The node stops acknowledging writes.
    #[error("fatal storage failure: {0}")]
    Fatal(String),
}

impl Error {
    /// Whether trying the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Conflict(_) | Error::Unavailable(_) | Error::Busy(_) | Error::Timeout(_))
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match &error {
            Error::InvalidInput(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Conflict(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Busy(_) => Code::ResourceExhausted,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Fatal(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

impl From<Status> for Error {
    /// A status received from a peer, classified the same way.
    fn from(status: Status) -> Error {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument | Code::FailedPrecondition => Error::InvalidInput(message),
            Code::OutOfRange => Error::OutOfRange(message),
            Code::NotFound => Error::NotFound(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::Aborted => Error::Conflict(message),
            Code::ResourceExhausted => Error::Busy(message),
            Code::DeadlineExceeded | Code::Cancelled => Error::Timeout(message),
            Code::Internal | Code::DataLoss => Error::Fatal(message),
            _ => Error::Unavailable(format!("{:?}: {message}", status.code())),
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(error: rocksdb::Error) -> Error {
        Error::Fatal(error.to_string())
    }
}
