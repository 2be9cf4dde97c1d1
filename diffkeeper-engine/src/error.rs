//! What the engine can fail with. A caller matches what it acts on: the
//! store's own errors ([`EngineError::Store`]: in use by another process,
//! damaged, a newer schema), a freeze that could not be made
//! ([`EngineError::Freeze`]), and input the engine refuses
//! ([`EngineError::Refused`]: the message says what and why). Every other
//! failure names the call that failed and keeps its cause
//! ([`EngineError::Failed`]), as a chain a log line shows whole.

use diffkeeper_store::StoreError;

use crate::freeze::FreezeError;

/// Why an engine operation failed. `{e}` shows its message, `{e:#}` the
/// message and every cause after it (as `anyhow` does).
#[derive(Debug)]
pub enum EngineError {
    Store(StoreError),
    Freeze(FreezeError),
    /// Input refused, or something missing that was asked for.
    Refused(String),
    /// A call that failed: what it was, and why.
    Failed {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    Io(std::io::Error),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Store(e) => write!(f, "{e}")?,
            EngineError::Freeze(e) => write!(f, "{e}")?,
            EngineError::Refused(why) => write!(f, "{why}")?,
            EngineError::Failed { what, .. } => write!(f, "{what}")?,
            EngineError::Io(e) => write!(f, "{e}")?,
        }
        if f.alternate() {
            write!(f, "{}", diffkeeper_common::error::causes(self))?;
        }
        Ok(())
    }
}

impl std::error::Error for EngineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // What the store's and the freezer's errors wrap, as theirs.
            EngineError::Store(e) => e.source(),
            EngineError::Freeze(e) => e.source(),
            EngineError::Failed { source, .. } => Some(source.as_ref()),
            EngineError::Io(e) => e.source(),
            EngineError::Refused(_) => None,
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> EngineError {
        EngineError::Store(e)
    }
}

impl From<FreezeError> for EngineError {
    fn from(e: FreezeError) -> EngineError {
        EngineError::Freeze(e)
    }
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> EngineError {
        EngineError::Io(e)
    }
}

impl From<std::fmt::Error> for EngineError {
    fn from(e: std::fmt::Error) -> EngineError {
        EngineError::Failed {
            what: "cannot format the text".to_string(),
            source: Box::new(e),
        }
    }
}

/// What the engine's calls return.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// This error, as the cause of a failure described by `what`.
    pub fn context(self, what: impl std::fmt::Display) -> EngineError {
        EngineError::Failed {
            what: what.to_string(),
            source: Box::new(self),
        }
    }

    /// The store's error this is, or was caused by.
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            EngineError::Store(e) => Some(e),
            EngineError::Failed { source, .. } => source
                .downcast_ref::<EngineError>()
                .and_then(EngineError::store_error)
                .or_else(|| source.downcast_ref::<StoreError>()),
            _ => None,
        }
    }

    /// The I/O error this is, or was caused by.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            EngineError::Io(e) => Some(e),
            EngineError::Failed { source, .. } => source
                .downcast_ref::<EngineError>()
                .and_then(EngineError::io_error)
                .or_else(|| source.downcast_ref::<std::io::Error>()),
            _ => None,
        }
    }

    /// The freeze error this is, or was caused by.
    pub fn freeze_error(&self) -> Option<&FreezeError> {
        match self {
            EngineError::Freeze(e) => Some(e),
            EngineError::Failed { source, .. } => source
                .downcast_ref::<EngineError>()
                .and_then(EngineError::freeze_error)
                .or_else(|| source.downcast_ref::<FreezeError>()),
            _ => None,
        }
    }
}

impl From<rustix::io::Errno> for EngineError {
    fn from(e: rustix::io::Errno) -> EngineError {
        EngineError::Io(e.into())
    }
}

impl From<diffkeeper_store::codec::CodecError> for EngineError {
    fn from(e: diffkeeper_store::codec::CodecError) -> EngineError {
        EngineError::Failed {
            what: "chunk encoding".to_string(),
            source: Box::new(e),
        }
    }
}

diffkeeper_common::context_trait!(EngineError, Failed, Refused);

/// `bail!` for the engine: returns an [`EngineError::Refused`].
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::EngineError::Refused(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// `anyhow!` for the engine: an [`EngineError::Refused`].
macro_rules! refused {
    ($($arg:tt)*) => {
        $crate::error::EngineError::Refused(format!($($arg)*))
    };
}
pub(crate) use refused;
