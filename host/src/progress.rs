//! A progress bar for long offline runs (`simulate`, `replay`): drawn on
//! stderr only when stderr is a terminal, so a pipe, a log file or CI
//! gets nothing.

use std::io::IsTerminal;

/// A bar, or nothing when stderr is not a terminal.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar of `total` units (`quanta` or `bytes`), with `what` before it.
    pub fn new(total: u64, what: &str, bytes: bool) -> Progress {
        if !std::io::stderr().is_terminal() || total == 0 {
            return Progress(None);
        }
        let template =
            if bytes { "{msg} {wide_bar} {bytes}/{total_bytes} ({eta} left)" } else { "{msg} {wide_bar} {pos}/{len} quanta ({eta} left)" };
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    /// Moves it to `position`.
    pub fn set(&self, position: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(position);
        }
    }

    /// Removes it from the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
