//! Showing an error with its causes, as the crates' error types do for
//! `{:#}` (the way `anyhow` shows a chain).

use std::error::Error;
use std::string::String;

/// `error`'s causes, each after ": ", to follow its own message.
pub fn causes(error: &dyn Error) -> String {
    let mut text = String::new();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&std::string::ToString::to_string(e));
        cause = e.source();
    }
    text
}

/// Defines a crate's `Context` trait for its error type `$error`, as
/// `anyhow::Context` is for `anyhow::Error`: `.context(what)` on a failed
/// `Result` gives `$error::$failed { what, source }`, on a `None` gives
/// `$error::$missing(what)`.
#[macro_export]
macro_rules! context_trait {
    ($error:ident, $failed:ident, $missing:ident) => {
        /// Names a failed call (its cause kept), or a missing piece.
        pub trait Context<T> {
            fn context(self, what: impl ::std::fmt::Display) -> ::std::result::Result<T, $error>;
            fn with_context<D: ::std::fmt::Display>(
                self,
                what: impl FnOnce() -> D,
            ) -> ::std::result::Result<T, $error>;
        }

        impl<T, E: ::std::error::Error + Send + Sync + 'static> Context<T>
            for ::std::result::Result<T, E>
        {
            fn context(self, what: impl ::std::fmt::Display) -> ::std::result::Result<T, $error> {
                self.with_context(|| what)
            }

            fn with_context<D: ::std::fmt::Display>(
                self,
                what: impl FnOnce() -> D,
            ) -> ::std::result::Result<T, $error> {
                self.map_err(|e| $error::$failed {
                    what: what().to_string(),
                    source: Box::new(e),
                })
            }
        }

        impl<T> Context<T> for Option<T> {
            fn context(self, what: impl ::std::fmt::Display) -> ::std::result::Result<T, $error> {
                self.with_context(|| what)
            }

            fn with_context<D: ::std::fmt::Display>(
                self,
                what: impl FnOnce() -> D,
            ) -> ::std::result::Result<T, $error> {
                self.ok_or_else(|| $error::$missing(what().to_string()))
            }
        }
    };
}
