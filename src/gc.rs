//! Garbage collection of our data dir (issue 17): kept copies, backups,
//! sync records and intents of domains libvirt no longer knows.
//!
//! The hook cannot ask libvirt (it would deadlock), so "known" is read from
//! libvirt's own per-domain files, which it writes before and removes after
//! the hook runs: a domain is known while any of these exists for its UUID:
//! - `/var/lib/libvirt/swtpm/<uuid>` (its TPM state; libvirt deletes it on
//!   `undefine`, and for a transient domain after `release`),
//! - a persistent definition `/etc/libvirt/qemu/<name>.xml` naming the UUID,
//! - a status file `/run/libvirt/qemu/<name>.xml` naming it (running, or
//!   on its way up or down).
//!
//! A stopped persistent domain still has its definition, so it is never
//! "gone"; only undefined and finished transient domains are. When one of
//! libvirt's dirs cannot be read (other than missing), nothing is removed.
//!
//! Order: data of gone domains older than `kept_retention_days` first; then,
//! while the data dir is over `max_state_dir_bytes`, the remaining gone
//! domains, oldest first. Data of a domain libvirt knows is never removed
//! (the cap may then stay exceeded: said once per run). A domain whose lock
//! someone holds is skipped, never waited for.

use crate::config::Config;
use crate::fs::{Anchor, DomainData, FsError, HostData};
use crate::paths::Paths;
use crate::state::DomainUuid;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Largest libvirt domain XML read to find its UUID.
const MAX_LIBVIRT_XML: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Removal {
    pub(crate) uuid: String,
    pub(crate) bytes: u64,
    pub(crate) age_days: u64,
    /// "retention" or "size cap".
    pub(crate) why: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct GcReport {
    pub(crate) dry_run: bool,
    pub(crate) used_bytes_before: u64,
    pub(crate) used_bytes_after: u64,
    pub(crate) max_state_dir_bytes: u64,
    pub(crate) kept_retention_days: u64,
    /// What was (or, with `dry_run`, would be) removed, in that order.
    pub(crate) removed: Vec<Removal>,
    /// Domains skipped because another process held their lock.
    pub(crate) busy: Vec<String>,
    /// Domains whose data stays.
    pub(crate) domains_kept: usize,
    /// Still over the cap: the rest belongs to domains libvirt knows.
    pub(crate) over_cap: bool,
}

/// The UUIDs libvirt knows on this host, from its own files.
pub(crate) fn known_domains(paths: &Paths) -> Result<HashSet<String>, FsError> {
    let mut known = HashSet::new();
    if let Some(base) = Anchor::SwtpmBase.open(paths)? {
        for name in base.list()? {
            if let Some(u) = DomainUuid::parse(&name) {
                known.insert(u.to_string());
            }
        }
    }
    for dir in ["/etc/libvirt/qemu", "/run/libvirt/qemu"] {
        let Some(d) = Anchor::Other(PathBuf::from(dir)).open(paths)? else {
            continue;
        };
        for name in d.list()? {
            if !name.ends_with(".xml") {
                continue;
            }
            let Some(bytes) = d.read_file(&name, MAX_LIBVIRT_XML)? else {
                continue;
            };
            if let Some(u) = first_uuid(&bytes) {
                known.insert(u.to_string());
            }
        }
    }
    Ok(known)
}

/// The text of the first `<uuid>` element (libvirt writes the domain's
/// own first; a status file's `<domstatus>` holds it in its `<domain>`).
fn first_uuid(xml: &[u8]) -> Option<DomainUuid> {
    let text = String::from_utf8_lossy(xml);
    let start = text.find("<uuid>")? + "<uuid>".len();
    let end = text[start..].find("</uuid>")? + start;
    DomainUuid::parse(text[start..end].trim())
}

fn age(d: &DomainData, now: SystemTime) -> Duration {
    now.duration_since(d.newest).unwrap_or(Duration::ZERO)
}

/// Decides what a run removes (`protect`: the domain the caller works on).
pub(crate) fn plan(
    paths: &Paths,
    config: &Config,
    now: SystemTime,
    protect: Option<&DomainUuid>,
    dry_run: bool,
) -> Result<GcReport, FsError> {
    let data = HostData::new(paths).scan_domains()?;
    let used: u64 = data.iter().map(|d| d.bytes).sum();
    let retention = Duration::from_secs(config.kept_retention_days.saturating_mul(86400));
    let cap = config.max_state_dir_bytes;
    let mut report = GcReport {
        dry_run,
        used_bytes_before: used,
        used_bytes_after: used,
        max_state_dir_bytes: cap,
        kept_retention_days: config.kept_retention_days,
        removed: Vec::new(),
        busy: Vec::new(),
        domains_kept: data.len(),
        over_cap: used > cap,
    };
    // The common case reads none of libvirt's files.
    if used <= cap && data.iter().all(|d| age(d, now) < retention) {
        return Ok(report);
    }
    let known = known_domains(paths)?;
    let mut gone: Vec<&DomainData> = data
        .iter()
        .filter(|d| !known.contains(d.uuid.as_str()) && Some(&d.uuid) != protect)
        .collect();
    gone.sort_by_key(|d| (d.newest, d.uuid.to_string()));
    let mut after = used;
    let mut chosen: Vec<(&DomainData, &'static str)> = Vec::new();
    for d in &gone {
        if age(d, now) >= retention {
            after -= d.bytes.min(after);
            chosen.push((d, "retention"));
        }
    }
    for d in &gone {
        if after <= cap {
            break;
        }
        if age(d, now) < retention {
            after -= d.bytes.min(after);
            chosen.push((d, "size cap"));
        }
    }
    report.removed = chosen
        .into_iter()
        .map(|(d, why)| Removal {
            uuid: d.uuid.to_string(),
            bytes: d.bytes,
            age_days: age(d, now).as_secs() / 86400,
            why,
        })
        .collect();
    report.used_bytes_after = after;
    report.domains_kept = data.len() - report.removed.len();
    report.over_cap = after > cap;
    Ok(report)
}

/// Runs a collection: plans it and, unless `dry_run`, removes (each domain
/// under its lock, skipped when busy).
pub(crate) fn run(
    paths: &Paths,
    config: &Config,
    dry_run: bool,
    protect: Option<&DomainUuid>,
) -> Result<GcReport, FsError> {
    let mut report = plan(paths, config, SystemTime::now(), protect, dry_run)?;
    if dry_run {
        return Ok(report);
    }
    let host = HostData::new(paths);
    let mut done = Vec::new();
    for r in std::mem::take(&mut report.removed) {
        let uuid = DomainUuid::parse(&r.uuid).expect("scanned names are UUIDs");
        let Some(_lock) = host.try_lock(&uuid) else {
            report.used_bytes_after += r.bytes;
            report.busy.push(r.uuid);
            continue;
        };
        host.remove_domain_data(&uuid)?;
        done.push(r);
    }
    report.removed = done;
    report.domains_kept += report.busy.len();
    report.over_cap = report.used_bytes_after > report.max_state_dir_bytes;
    Ok(report)
}

/// How long a scan spares the scans of [`enforce`]: a scan walks every
/// domain's data (a few microseconds per domain with a warm cache: +1.4 ms
/// on a 3 ms `stopped end` at 500 domains here, docs/BENCHMARKS.md
/// "Storms"; linear, so it would dominate on larger hosts), and it ran
/// inside every stop, restore and store. Within that window each writer
/// that skips the scan adds what it is about to write to the scan's total;
/// once the total (an upper bound: a kept copy replaces the previous one)
/// passes half the cap, or the window ends, the next writer scans again.
pub(crate) const SCAN_FRESH: Duration = Duration::from_secs(600);

/// `<run>/gc-usage`: `<bytes used> <unix seconds of the scan>` from the last
/// scan, then one `+<bytes>` line per write that skipped a scan since. A
/// hint (`fs::Dir::write_hint`): anything torn or unreadable means "scan".
const USAGE_FILE: &str = "gc-usage";

/// Largest usage file read: beyond it, scan (its lines are ~10 bytes).
const USAGE_FILE_MAX: u64 = 64 * 1024;

/// Whether the last scan (`text` of the usage file) and the writes since
/// leave room for `adding` more bytes under half of `cap` at `now`, so that
/// this writer may skip the scan. Pure.
pub(crate) fn scan_still_fresh(text: &str, now: SystemTime, cap: u64, adding: u64) -> bool {
    let mut lines = text.lines();
    let mut head = lines.next().unwrap_or("").split_whitespace();
    let (Some(Ok(used)), Some(Ok(at))) = (
        head.next().map(str::parse::<u64>),
        head.next().map(str::parse::<u64>),
    ) else {
        return false;
    };
    let mut total = used;
    for line in lines {
        match line.strip_prefix('+').map(str::parse::<u64>) {
            Some(Ok(b)) => total = total.saturating_add(b),
            _ => return false,
        }
    }
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
    let age = now.duration_since(at).unwrap_or(Duration::MAX);
    total.saturating_add(adding) <= cap / 2 && age < SCAN_FRESH
}

/// The cap, enforced before a new kept copy or backup of `uuid` (`adding`
/// bytes at most) is written (hook, `restore`, `store`), unless the last
/// scan is fresh and far from the cap ([`SCAN_FRESH`]). Never fails the
/// caller: problems are logged.
pub(crate) fn enforce(paths: &Paths, config: &Config, uuid: &DomainUuid, adding: u64) {
    let host = HostData::new(paths);
    let now = SystemTime::now();
    if let Ok(Some(text)) = host.read_run_file(USAGE_FILE, USAGE_FILE_MAX) {
        let cap = config.max_state_dir_bytes;
        if scan_still_fresh(&String::from_utf8_lossy(&text), now, cap, adding) {
            let line = format!("+{adding}\n");
            // A hint that cannot be written is no hint (the write that
            // follows says what is wrong with the disk, in one line).
            if let Err(e) = host.write_run_hint(USAGE_FILE, line.as_bytes(), true) {
                log::debug!("{e}");
            } else {
                return;
            }
        }
    }
    match run(paths, config, false, Some(uuid)) {
        Ok(r) => {
            let at = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let head = format!("{} {at}\n", r.used_bytes_after);
            if let Err(e) = host.write_run_hint(USAGE_FILE, head.as_bytes(), false) {
                log::debug!("{e}");
            }
            for x in &r.removed {
                log::info!(
                    "removed the kept data of domain {} ({} bytes, {} days old; {}): libvirt no longer knows it",
                    x.uuid,
                    x.bytes,
                    x.age_days,
                    x.why
                );
            }
            if r.over_cap {
                log::warn!(
                    "{} uses {} bytes, over max_state_dir_bytes = {}; the rest belongs to domains libvirt still knows",
                    paths.data_dir().display(),
                    r.used_bytes_after,
                    r.max_state_dir_bytes
                );
            }
        }
        Err(e) => log::warn!("garbage collection skipped: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_scan_under_half_the_cap_spares_the_next() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |d: u64| t0 + Duration::from_secs(d);
        assert!(scan_still_fresh("90 1000000\n", at(10), 200, 10));
        assert!(!scan_still_fresh("90 1000000\n", at(10), 200, 11));
        // The writes since the scan count.
        assert!(scan_still_fresh("50 1000000\n+20\n+20\n", at(10), 200, 10));
        assert!(!scan_still_fresh("50 1000000\n+20\n+21\n", at(10), 200, 10));
        assert!(!scan_still_fresh("10 1000000\n", at(600), 200, 1));
        assert!(
            !scan_still_fresh("10 1000020\n", at(0), 200, 1),
            "from the future"
        );
        for bad in [
            "",
            "100",
            "x 1",
            "100 y",
            "-1 5",
            "1 1000000\n+x",
            "1 1000000\n5",
        ] {
            assert!(!scan_still_fresh(bad, at(1), 200, 1), "{bad:?}");
        }
    }
}
