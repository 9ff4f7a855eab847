//! Logging for both binaries: syslog (the journal picks it up) when it can be
//! reached, otherwise stderr. The hook's stderr is what libvirt shows the user
//! on failure, so without syslog only warnings and errors go there, and the
//! final error line is printed once by `main`, not by the logger.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::sync::Mutex;
use syslog::{Facility, Formatter3164, Logger, LoggerBackend};

struct Dual {
    syslog: Option<Mutex<Logger<LoggerBackend, Formatter3164>>>,
    stderr_level: LevelFilter,
    level: LevelFilter,
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
        match &self.syslog {
            Some(s) => {
                if let Ok(mut s) = s.lock() {
                    let _ = match r.level() {
                        Level::Error => s.err(&msg),
                        Level::Warn => s.warning(&msg),
                        Level::Info => s.info(&msg),
                        Level::Debug | Level::Trace => s.debug(&msg),
                    };
                }
            }
            None => {
                if r.level() <= self.stderr_level {
                    eprintln!("{}: {}", r.level().as_str().to_lowercase(), msg);
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Whether log lines reach syslog (else they go to stderr, filtered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Syslog,
    Stderr,
}

/// Installs the logger. `stderr_level` applies when syslog is unreachable;
/// `level` is the overall verbosity.
pub fn init(ident: &str, level: LevelFilter, stderr_level: LevelFilter) -> Sink {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: ident.to_string(),
        pid: std::process::id(),
    };
    let syslog = syslog::unix(formatter).ok().map(Mutex::new);
    let sink = if syslog.is_some() {
        Sink::Syslog
    } else {
        Sink::Stderr
    };
    let _ = log::set_boxed_logger(Box::new(Dual {
        syslog,
        stderr_level,
        level,
    }));
    log::set_max_level(level);
    sink
}

/// Replaces Rust's multi-line panic report with one line that names the
/// place, never a payload (which could hold data), and asks for a report.
pub fn install_panic_hook(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!(
            "{program}: internal error at {at}; nothing more was done. Please report this bug."
        );
        log::error!("{line}");
        eprintln!("{line}");
    }));
}
