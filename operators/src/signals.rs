//! Ctrl-C and `kill`: SIGINT and SIGTERM stop a job through its normal cancellation, so staged
//! outputs and temporary files are removed and the process exits with 130 or 143. Commands
//! that write outputs call [`catch_interrupts`]; long loops and running pipelines check
//! [`interrupted`]. A second signal of the same kind ends the process at once (the default
//! action), for a job that does not stop quickly enough.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The signal received (0: none yet), once the handlers are in.
static RECEIVED: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// Woken once a caught signal has arrived, by a watcher thread: [`until_interrupted`] waits on
/// it rather than on a runtime's timer, which only the runtime's workers drive — workers that a
/// long computation (a join's inner loop) may keep from it for minutes.
static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Catches SIGINT and SIGTERM for the rest of the process: the first sets the flag that
/// [`interrupted`] reads, a second of the same kind terminates. Idempotent.
///
/// # Errors
/// When a handler cannot be installed.
pub fn catch_interrupts() -> std::io::Result<()> {
    if RECEIVED.get().is_some() {
        return Ok(());
    }
    let received = Arc::new(AtomicUsize::new(0));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let seen = Arc::new(AtomicBool::new(false));
        // The conditional default runs first and sees the flag before this signal sets it:
        // only a second signal terminates.
        signal_hook::flag::register_conditional_default(signal, seen.clone())?;
        signal_hook::flag::register(signal, seen)?;
        signal_hook::flag::register_usize(signal, received.clone(), signal as usize)?;
    }
    if RECEIVED.set(received).is_ok() {
        std::thread::Builder::new().name("cnclip-signals".into()).spawn(|| {
            while interrupted().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            WAKE.notify_waiters();
        })?;
    }
    Ok(())
}

/// The signal that asked the job to stop, if one did (`"SIGINT"` or `"SIGTERM"`); always
/// `None` unless [`catch_interrupts`] was called (library users are unaffected).
pub fn interrupted() -> Option<&'static str> {
    match RECEIVED.get()?.load(Ordering::Relaxed) as i32 {
        0 => None,
        signal_hook::consts::SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

/// A wait that a caught signal ended (a request to an object store): the job stops, and exits
/// 130 or 143. As an `io::Error` it is of kind `Other`, not `Interrupted`, which readers retry.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("stopped by {0}")]
pub struct Stopped(pub &'static str);

impl From<Stopped> for std::io::Error {
    fn from(stopped: Stopped) -> Self {
        std::io::Error::other(stopped)
    }
}

/// Whether [`catch_interrupts`] is in force.
pub fn catching() -> bool {
    RECEIVED.get().is_some()
}

/// Resolves once a caught signal has arrived (within 20 ms; never unless
/// [`catch_interrupts`] was called). Needs no timer of the runtime it runs on.
pub async fn until_interrupted() -> &'static str {
    loop {
        let notified = WAKE.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read: a wake between the two is not lost.
        notified.as_mut().enable();
        if let Some(signal) = interrupted() {
            return signal;
        }
        notified.await;
    }
}
