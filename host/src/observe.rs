//! What the daemon does with each quantum after apply, besides logging it:
//! record it (`run --record`) and hand it to a shadow policy (`run
//! --shadow`). Both run after apply, so neither can delay or change an
//! action; a recorder that fails stops recording, not the daemon.

use crate::pipeline::Trace;
use crate::record::{RecordError, RecordOptions, Recorder};
use crate::shadow::Shadow;

/// The daemon's after-apply observers.
#[derive(Default)]
pub struct Observers {
    recorder: Option<Recorder>,
    shadow: Option<Shadow>,
}

impl Observers {
    /// Opens the record directory (an unsafe one is an error: the daemon
    /// does not start) and starts the shadow.
    pub fn start(
        record: Option<RecordOptions>,
        shadow: Option<&str>,
        connect: &str,
        dry_run: bool,
        config: &crate::config::Config,
    ) -> Result<Observers, RecordError> {
        let recorder = record.map(|r| Recorder::open(r, connect, dry_run, config.guard.clone())).transpose()?;
        if let Some(r) = &recorder {
            tracing::info!(dir = %r.dir().display(), "recording every quantum");
        }
        Ok(Observers { recorder, shadow: shadow.map(|spec| Shadow::start(spec, config)) })
    }

    /// After a quantum's apply. `slots` are the active slot names.
    pub fn quantum(&mut self, trace: &Trace, slots: impl FnOnce() -> Vec<String>) {
        if let Some(recorder) = &mut self.recorder {
            if let Err(error) = recorder.write(trace, &slots()) {
                tracing::error!(error = %crate::error_chain(&error), frames = recorder.frames(), "record: cannot write; recording stops (the daemon carries on)");
                self.recorder = None;
            }
        }
        if let Some(shadow) = &mut self.shadow {
            shadow.offer(trace);
        }
    }

    /// At exit: the shadow's summary.
    pub fn finish(self) {
        if let Some(recorder) = &self.recorder {
            tracing::info!(dir = %recorder.dir().display(), frames = recorder.frames(), "record: stopped");
        }
        if let Some(shadow) = self.shadow {
            shadow.finish();
        }
    }
}
