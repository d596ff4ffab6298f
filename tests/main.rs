//! The one integration-test binary (ripgrep's layout): a module per topic,
//! shared helpers in `util`.

mod cli;
mod guard_table;
mod sandbox_limits;
mod simulate;
mod util;
