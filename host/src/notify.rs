//! systemd readiness (`Type=notify`) through the `sd-notify` crate.
//!
//! Why: `systemctl start` returns once the daemon has really balanced a
//! quantum (READY=1 after the first one, not at exec), a reload is visible
//! as one (RELOADING=1 with MONOTONIC_USEC, then READY=1), a stop too
//! (STOPPING=1), and a stuck loop is restarted by systemd's watchdog
//! (WATCHDOG=1 every quantum when `WatchdogSec=` is set). Without
//! `NOTIFY_SOCKET` every call is a no-op.

use sd_notify::NotifyState;

/// Sends the daemon's state to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog_usec: Option<u64>,
}

impl Notifier {
    /// From the environment systemd gives (`NOTIFY_SOCKET`, `WATCHDOG_USEC`).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        // sd_watchdog_enabled(3): WATCHDOG_USEC enables it; WATCHDOG_PID,
        // when set, must be this process (else a parent's watchdog was
        // inherited). `sd_notify::watchdog_enabled` also refuses an unset
        // WATCHDOG_PID, which the man page allows.
        let pid_ok = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim().parse::<u32>().ok() == Some(std::process::id()));
        let watchdog_usec = std::env::var("WATCHDOG_USEC").ok().and_then(|u| u.trim().parse::<u64>().ok()).filter(|u| *u > 0 && pid_ok);
        Notifier { enabled, watchdog_usec }
    }

    /// The watchdog interval systemd asked for, µs.
    pub fn watchdog_usec(&self) -> Option<u64> {
        self.watchdog_usec
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(error) = sd_notify::notify(false, states) {
            tracing::debug!(%error, "cannot notify the service manager");
        }
    }

    /// READY=1 with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// RELOADING=1 (with MONOTONIC_USEC, which systemd 253+ requires).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// STOPPING=1.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// WATCHDOG=1, when systemd set a watchdog.
    pub fn watchdog(&self) {
        if self.watchdog_usec.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }
}
