//! Logging from a policy: the WIT `log` import on wasm, a hook natively.

use std::sync::OnceLock;

/// Severity of a log line (mirrors the WIT `level` enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very detailed.
    Trace,
    /// Useful when debugging a policy.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something is wrong.
    Error,
}

static NATIVE_HOOK: OnceLock<fn(Level, &str)> = OnceLock::new();

/// Where native (non-wasm) builds of a policy send log lines. The daemon
/// sets this so its native fallback logs through `tracing`; without a hook,
/// native log lines are dropped.
pub fn set_native_log_hook(hook: fn(Level, &str)) {
    let _ = NATIVE_HOOK.set(hook);
}

/// Logs a line through the host.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::Level as L;
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        crate::bindings::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(hook) = NATIVE_HOOK.get() {
        hook(level, message);
    }
}
