//! Blocking twins of async clients: one macro writes the methods that run an async client's call on
//! a runtime the blocking client owns.
//!
//! Why a macro: the rendezvous and the parameter-server clients each have a blocking twin whose
//! every method is the same one line (`self.rt.block_on(self.inner.method(args))`); written by hand
//! the signatures stood twice in each crate and drifted.

/// Writes, inside an `impl` of a struct with fields `rt` (a tokio `Runtime`) and `inner` (the
/// async client), a public method per line that blocks on the async method of the same name with
/// the same arguments.
///
/// ```
/// struct Async;
/// impl Async {
///     async fn add(&self, a: i64, b: i64) -> i64 { a + b }
/// }
/// struct Blocking { rt: tokio::runtime::Runtime, inner: Async }
/// impl Blocking {
///     tandem_core::blocking_twins! {
///         /// See `Async::add`.
///         fn add(&self, a: i64, b: i64) -> i64;
///     }
/// }
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let b = Blocking { rt, inner: Async };
/// assert_eq!(b.add(2, 3), 5);
/// ```
#[macro_export]
macro_rules! blocking_twins {
    ($($(#[$attr:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;)*) => {
        $(
            $(#[$attr])*
            pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                self.rt.block_on(self.inner.$name($($arg),*))
            }
        )*
    };
}
