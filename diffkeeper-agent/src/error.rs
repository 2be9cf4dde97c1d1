//! What the agent can fail with: the engine's and the tracer's errors as
//! they are (match them through [`AgentError::Engine`] and
//! [`AgentError::Tracer`]), input refused ([`AgentError::Refused`]), and
//! every other failure naming the call that failed with its cause.

use diffkeeper_engine::EngineError;
use diffkeeper_tracer::TracerError;

/// Why the agent failed. `{e}` shows its message, `{e:#}` the message and
/// every cause after it.
#[derive(Debug)]
pub enum AgentError {
    Engine(EngineError),
    Tracer(TracerError),
    /// Input refused: the message says what and why.
    Refused(String),
    /// A call that failed: what it was, and why.
    Failed {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    Io(std::io::Error),
}

/// What the agent's calls return.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Engine(e) => write!(f, "{e}")?,
            AgentError::Tracer(e) => write!(f, "{e}")?,
            AgentError::Refused(why) => write!(f, "{why}")?,
            AgentError::Failed { what, .. } => write!(f, "{what}")?,
            AgentError::Io(e) => write!(f, "{e}")?,
        }
        if f.alternate() {
            write!(f, "{}", diffkeeper_common::error::causes(self))?;
        }
        Ok(())
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // What the engine's and the tracer's errors wrap, as theirs.
            AgentError::Engine(e) => e.source(),
            AgentError::Tracer(e) => e.source(),
            AgentError::Failed { source, .. } => Some(source.as_ref()),
            AgentError::Io(e) => e.source(),
            AgentError::Refused(_) => None,
        }
    }
}

impl AgentError {
    /// This error, as the cause of a failure described by `what`.
    pub fn context(self, what: impl std::fmt::Display) -> AgentError {
        AgentError::Failed {
            what: what.to_string(),
            source: Box::new(self),
        }
    }

    /// The engine's error this is, or was caused by.
    pub fn engine_error(&self) -> Option<&EngineError> {
        match self {
            AgentError::Engine(e) => Some(e),
            AgentError::Failed { source, .. } => source
                .downcast_ref::<AgentError>()
                .and_then(AgentError::engine_error)
                .or_else(|| source.downcast_ref::<EngineError>()),
            _ => None,
        }
    }
}

impl From<EngineError> for AgentError {
    fn from(e: EngineError) -> AgentError {
        AgentError::Engine(e)
    }
}

impl From<TracerError> for AgentError {
    fn from(e: TracerError) -> AgentError {
        AgentError::Tracer(e)
    }
}

impl From<std::io::Error> for AgentError {
    fn from(e: std::io::Error) -> AgentError {
        AgentError::Io(e)
    }
}

impl From<diffkeeper_engine::store::StoreError> for AgentError {
    fn from(e: diffkeeper_engine::store::StoreError) -> AgentError {
        AgentError::Engine(e.into())
    }
}

impl From<diffkeeper_engine::freeze::FreezeError> for AgentError {
    fn from(e: diffkeeper_engine::freeze::FreezeError) -> AgentError {
        AgentError::Engine(e.into())
    }
}

diffkeeper_common::context_trait!(AgentError, Failed, Refused);
