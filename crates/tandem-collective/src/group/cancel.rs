//! Cancelling a group while it forms: forming waits on other ranks for up to its connect
//! deadline, and a caller (Ctrl-C in Python, an elastic run giving up) must be able to stop it
//! sooner with a reason.

use std::future::Future;

use super::*;

/// Stops a group that is forming: every step waits on it as well as on its deadline, so forming
/// ends within moments of [`Cancel::cancel`] with an error saying it was cancelled (and why).
///
/// ```
/// let cancel = tandem_collective::Cancel::new();
/// let c = cancel.clone();
/// std::thread::spawn(move || c.cancel("interrupted by Ctrl-C"));
/// // ProcessGroup::init_cancellable(&spec, token, config, &cancel) would now return promptly.
/// # let _ = cancel;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    /// Why forming was cancelled, once it was.
    why: watch::Sender<Option<String>>,
}

impl Cancel {
    /// A token nobody has cancelled yet.
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Cancels whatever waits on this token (the first reason stands).
    pub fn cancel(&self, why: &str) {
        self.why.send_if_modified(|w| {
            if w.is_none() {
                *w = Some(why.to_string());
                true
            } else {
                false
            }
        });
    }

    /// Whether it was cancelled, and why.
    pub fn reason(&self) -> Option<String> {
        self.why.borrow().clone()
    }

    /// Runs `fut` on `rt` until it ends or this token is cancelled.
    pub(super) fn run<T>(
        &self,
        rt: &Runtime,
        what: &str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut rx = self.why.subscribe();
        rt.block_on(async {
            tokio::select! {
                r = fut => r,
                _ = rx.wait_for(Option::is_some) => Err(Error::Unusable {
                    what: "process group".into(),
                    reason: format!(
                        "forming it was cancelled while {what}: {}",
                        self.reason().unwrap_or_default()
                    ),
                }),
            }
        })
    }
}
