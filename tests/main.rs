//! The one integration-test binary (ripgrep's layout): a module per topic,
//! shared helpers in `util`.

mod author_tools;
mod cli;
mod file_trust;
mod guard_table;
mod hot_swap;
mod languages;
mod libvirt_e2e;
mod operating;
mod peer_suite;
mod record_replay;
mod sandbox_limits;
mod simulate;
mod util;
