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
        // The one escaping rule, for every line logged: whatever a message
        // quotes from the domain XML stays on one line and cannot steer the
        // terminal.
        let msg = escaped(&r.args().to_string());
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
    let line = escaped(line);
    let line = line.as_str();
    if let Some(l) = LOGGER.get() {
        l.to_syslog(Level::Error, line);
    }
    eprintln!("{line}");
}

/// Whether `c` is shown escaped: C0 and C1 controls and DEL (newlines
/// included), Unicode line/paragraph separators, and the bidirectional
/// formatting characters (which reorder what a terminal shows).
pub(crate) fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// The one escaping rule for every string derived from the domain XML that
/// reaches stderr, syslog or the terminal: each character of
/// [`needs_escape`] becomes `\n`, `\r`, `\t` or `\u{XXXX}` (Rust's
/// `escape_default` spelling); everything else is kept.
pub(crate) fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The same rule for JSON text (`serde_json` output): every character of
/// [`needs_escape`] left raw (C1, DEL, bidi, separators) becomes a `\uXXXX`
/// escape, so the JSON shows them escaped and still decodes to the exact
/// value. Such characters occur only inside JSON strings (C0 controls in
/// strings are escaped by `serde_json` itself).
pub(crate) fn json_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        // C0 inside strings is escaped by serde_json already; outside them
        // it is the pretty printer's whitespace.
        if needs_escape(c) && !c.is_ascii_control() {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints one line on stdout with `escaped` applied: for every line the
/// terminal shows that quotes the domain XML or the element.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {
        $crate::logging::out(&format!("{}\n", $crate::logging::escaped(&format!($($t)*))))
    };
}

/// Writes `s` to stdout. A closed pipe (`show | head`) ends the process
/// quietly with exit 0: the reader has what it wanted.
pub(crate) fn out(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(s.as_bytes()).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("virt-tpm-state: cannot write to stdout: {e}");
        std::process::exit(1);
    }
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
