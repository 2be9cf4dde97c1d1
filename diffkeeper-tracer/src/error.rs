//! What the tracer can fail with. The cases a caller acts on have their
//! own variants (no privileges to load, a root id already taken, too many
//! trees); every other failure names the call that failed and keeps the
//! OS's or aya's error as its source.

use std::path::PathBuf;

/// Why the tracer could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// The kernel refused the programs (privileges, lockdown, verifier).
    #[error("cannot load the eBPF object: {hint}")]
    Load {
        hint: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("root {0} is already watched")]
    AlreadyWatched(u32),
    #[error("root {0} is not watched")]
    NotWatched(u32),
    #[error("cannot watch {path}: the tracer watches {max} trees at most")]
    TooManyRoots { path: PathBuf, max: usize },
    /// Something the kernel, its BTF or the eBPF object lacks or refuses.
    #[error("{0}")]
    Unsupported(String),
    /// A map of the programs could not be read or written.
    #[error(transparent)]
    Map(Box<aya::maps::MapError>),
    /// A call that failed: what it was, and why.
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<aya::maps::MapError> for TracerError {
    fn from(e: aya::maps::MapError) -> TracerError {
        TracerError::Map(Box::new(e))
    }
}

impl TracerError {
    /// This error and its causes, one after another (as `anyhow`'s `{:#}`
    /// shows them), for a log line.
    pub fn chain(&self) -> String {
        format!("{self}{}", diffkeeper_common::error::causes(self))
    }
}

/// What the tracer's calls return.
pub type Result<T, E = TracerError> = std::result::Result<T, E>;

diffkeeper_common::context_trait!(TracerError, Failed, Unsupported);

/// `bail!` for the tracer: an [`TracerError::Unsupported`] made of a
/// message.
macro_rules! unsupported {
    ($($arg:tt)*) => {
        return Err($crate::error::TracerError::Unsupported(format!($($arg)*)))
    };
}
pub(crate) use unsupported;
