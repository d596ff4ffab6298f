//! `vm-balancer top`: a live view of a running daemon, refreshed each
//! quantum, from its read-only status socket ([`crate::status`]).
//!
//! Why ratatui over crossterm: a well-kept TUI crate that restores the
//! terminal on exit; the view is three tables a person reads top to
//! bottom: host CPUs (load, vCPUs on them), domains (balloon target, usable
//! memory, last action and its reason), policies (decide time, failures).

use std::path::Path;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

use crate::status::{fetch, Status, StatusError};

/// Why `top` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The daemon could not be reached at start.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// The terminal failed.
    #[error("terminal error")]
    Terminal(#[from] std::io::Error),
}

/// Runs the view until q, Esc or Ctrl-C.
pub fn run(socket: &Path) -> Result<(), TopError> {
    // Fail before taking the terminal: the message stays readable.
    let mut status = fetch(socket)?;
    let mut error: Option<String> = None;
    let mut terminal = ratatui::init();
    let result = (|| -> Result<(), TopError> {
        loop {
            terminal.draw(|frame| draw(frame, &status, error.as_deref()))?;
            let refresh = Duration::from_millis(u64::from(status.quantum_ms)).clamp(Duration::from_millis(200), Duration::from_secs(5));
            if event::poll(refresh)? {
                if let Event::Key(key) = event::read()? {
                    let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(event::KeyModifiers::CONTROL);
                    if key.kind == KeyEventKind::Press && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c) {
                        return Ok(());
                    }
                }
            }
            match fetch(socket) {
                Ok(now) => {
                    status = now;
                    error = None;
                }
                Err(e) => error = Some(crate::error_chain(&e)),
            }
        }
    })();
    ratatui::restore();
    result
}

fn mib(v: Option<u64>) -> String {
    v.map_or("?".to_string(), |v| format!("{v} MiB"))
}

/// One screen of the status.
pub fn draw(frame: &mut Frame, s: &Status, error: Option<&str>) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let cpu_rows = s.cpus.len() as u16 + 3;
    let policy_rows = s.policies.len() as u16 + 3;
    let [head, cpus, domains, policies] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(cpu_rows.min(12)),
        Constraint::Min(5),
        Constraint::Length(policy_rows),
    ])
    .areas(frame.area());
    let mut header = vec![Line::from(format!(
        "vm-balancer top  {}  quantum {} ({} ms, took {:.1} ms)  host available {} MiB / {} MiB, reserve {} MiB   q: quit",
        s.connect, s.quantum, s.quantum_ms, s.took_ms, s.host_available_mib, s.host_total_mib, s.host_reserve_mib
    ))];
    if let Some(e) = error {
        header.push(Line::from(format!("daemon unreachable: {e}")));
    } else if s.skipped > 0 {
        header.push(Line::from(format!(
            "{} quanta skipped in a row: nothing collected (libvirt down, or slower than collect_deadline_ms); figures below are older",
            s.skipped
        )));
    }
    frame.render_widget(Paragraph::new(header), head);
    let rows = s.cpus.iter().map(|c| {
        Row::new(vec![
            format!("cpu {}{}", c.id, if c.usable { "" } else { " (reserved/offline)" }),
            format!("{:>5.1}%", c.load * 100.0),
            c.vcpus.join(" "),
        ])
    });
    let table = Table::new(rows, [Constraint::Length(24), Constraint::Length(8), Constraint::Min(10)])
        .header(Row::new(vec!["pCPU", "load", "vCPUs"]).style(bold))
        .block(Block::default().borders(Borders::ALL).title("host CPUs"));
    frame.render_widget(table, cpus);
    let rows = s.domains.iter().map(|d| {
        let last = d.actions.last();
        Row::new(vec![
            d.name.clone(),
            format!("{} MiB", d.balloon_target_mib),
            mib(d.usable_mib),
            format!("{:.2}", d.vcpu_demand),
            last.map_or("-".to_string(), |a| format!("q{} {} {}", a.quantum, a.verdict, a.action)),
            last.map_or(
                String::new(),
                |a| if a.guard.is_empty() { a.reason.clone() } else { format!("{} (guard: {})", a.reason, a.guard) },
            ),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(36),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(vec!["domain", "balloon", "usable", "demand", "last action", "reason"]).style(bold))
    .block(Block::default().borders(Borders::ALL).title("domains"));
    frame.render_widget(table, domains);
    let rows = s.policies.iter().map(|p| {
        let failures: Vec<String> = p.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
        Row::new(vec![
            p.slot.clone(),
            p.policy.clone(),
            format!("{} us", p.decide_median_us),
            format!("{} us", p.decide_max_us),
            format!("{}", p.decided),
            format!("{}", p.fallbacks),
            if failures.is_empty() { "none".to_string() } else { failures.join(", ") },
            if p.disabled { "DISABLED".to_string() } else { "ok".to_string() },
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(14),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Min(10),
            Constraint::Length(9),
        ],
    )
    .header(Row::new(vec!["slot", "policy", "median", "slowest", "decided", "fallback", "failures", "state"]).style(bold))
    .block(Block::default().borders(Borders::ALL).title("policies"));
    frame.render_widget(table, policies);
}
