//! Logging for both binaries: syslog (the journal picks it up) when it can be
//! reached, otherwise stderr. The hook's stderr is what libvirt shows the user
//! on failure, so without syslog only warnings and errors go there, and the
//! final error line is printed once, by [`report_error`].
//!
//! syslog is opened on the first line logged, not at start: the hook runs in
//! every VM start, and most of its runs log nothing.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::sync::{Mutex, OnceLock};
use syslog::{Facility, Formatter3164, Logger, LoggerBackend};

type Syslog = Logger<LoggerBackend, Formatter3164>;

struct Dual {
    ident: String,
    /// `None` until first use; then `Some(None)` when syslog is unreachable.
    syslog: Mutex<Option<Option<Syslog>>>,
    stderr_level: LevelFilter,
    level: LevelFilter,
}

static LOGGER: OnceLock<Dual> = OnceLock::new();

impl Dual {
    /// Sends `msg` to syslog, connecting on first use; false when unreachable.
    fn to_syslog(&self, level: Level, msg: &str) -> bool {
        let Ok(mut slot) = self.syslog.lock() else {
            return false;
        };
        let conn = slot.get_or_insert_with(|| {
            syslog::unix(Formatter3164 {
                facility: Facility::LOG_DAEMON,
                hostname: None,
                process: self.ident.clone(),
                pid: std::process::id(),
            })
            .ok()
        });
        let Some(s) = conn else {
            return false;
        };
        let sent = match level {
            Level::Error => s.err(msg),
            Level::Warn => s.warning(msg),
            Level::Info => s.info(msg),
            Level::Debug | Level::Trace => s.debug(msg),
        };
        sent.is_ok()
    }
}

impl Log for Dual {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        if !self.to_syslog(r.level(), &msg) && r.level() <= self.stderr_level {
            eprintln!("{}: {}", r.level().as_str().to_lowercase(), msg);
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. `stderr_level` applies when syslog is unreachable;
/// `level` is the overall verbosity.
pub fn init(ident: &str, level: LevelFilter, stderr_level: LevelFilter) {
    let dual = LOGGER.get_or_init(|| Dual {
        ident: ident.to_string(),
        syslog: Mutex::new(None),
        stderr_level,
        level,
    });
    let _ = log::set_logger(dual);
    log::set_max_level(level);
}

/// The one error line of a failed run: to stderr (what libvirt shows the
/// user), and to syslog when it can be reached.
pub fn report_error(line: &str) {
    // One line, whatever a message quotes from hostile input (a path or a
    // name from the domain XML may hold a newline as `&#10;`).
    let line: String = line
        .chars()
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            escaped
                .into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect();
    let line = line.as_str();
    if let Some(l) = LOGGER.get() {
        l.to_syslog(Level::Error, line);
    }
    eprintln!("{line}");
}

/// Replaces Rust's multi-line panic report with one line that names the
/// place, never a payload (which could hold data), and asks for a report.
pub fn install_panic_hook(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        report_error(&format!(
            "{program}: internal error at {at}; nothing more was done. Please report this bug."
        ));
    }));
}
