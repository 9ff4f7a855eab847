//! `status`: per domain with an emulated TPM, what the metadata holds, how
//! old it is, whether this host's local state matches it, and the watch
//! daemon's pending work. Exits 20 when a domain has been out of sync longer
//! than `status_max_lag_secs`, for monitoring.

use super::{CliError, Ctx, StatusArgs};
use crate::carried::{Carried, Running};
use crate::domain::{parse_domain, DomainInfo};
use crate::format::{declared_digest, read_header};
use crate::fs::HostData;
use crate::libvirt::Libvirt;
use crate::name::DomainName;
use crate::state::Sha256Sum;
use crate::watch::{read_daemon_status, DaemonStatus};
use std::time::{Duration, SystemTime};

#[derive(Debug, serde::Serialize)]
struct Row {
    domain: String,
    uuid: String,
    running: bool,
    persistent: bool,
    /// Generation in the metadata (the config copy for a persistent domain).
    generation: Option<u64>,
    digest: Option<String>,
    stored: Option<String>,
    age_secs: Option<u64>,
    local_digest: Option<String>,
    /// Every copy of the metadata (live and config) holds the local state.
    in_sync: bool,
    out_of_sync_since: Option<String>,
    out_of_sync_secs: Option<u64>,
    pending: bool,
    last_error: Option<String>,
    /// Out of sync longer than the threshold.
    alert: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    daemon: Option<DaemonStatus>,
    max_lag_secs: u64,
    domains: Vec<Row>,
    /// Set when the command fails (exit 20): `{kind, exit, message}`.
    error: Option<serde_json::Value>,
    /// Bytes our data dir holds (kept copies, backups, J, intents), and
    /// its cap.
    /// `None` when our data dir cannot be read (not root): unknown, not 0.
    disk_used_bytes: Option<u64>,
    max_state_dir_bytes: u64,
    /// Post-stop stores that could not finish yet, oldest first; `None`
    /// when our data dir cannot be read (not root): unknown, not none.
    pending_stores: Option<Vec<PendingRow>>,
}

/// A post-stop store recorded and not completed yet (issue 22).
#[derive(Debug, serde::Serialize)]
struct PendingRow {
    uuid: String,
    /// The domain's name, when libvirt lists a domain with a TPM by it.
    domain: Option<String>,
    /// The final state waiting to be stored.
    digest: String,
    since: String,
    age_secs: u64,
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

fn secs_since(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn header(info: &DomainInfo) -> Option<(crate::format::Provenance, Sha256Sum)> {
    info.metadata.as_ref().and_then(|el| read_header(el).ok())
}

pub(crate) fn status(ctx: &Ctx, args: &StatusArgs) -> Result<(), CliError> {
    let max_lag = args.max_lag.unwrap_or(ctx.config.status_max_lag_secs);
    let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
    let daemon = read_daemon_status(ctx);
    let host = HostData::new(&ctx.paths);
    let ns = &ctx.config.namespace;
    let mut rows = Vec::new();
    for dom in lv.all_domains()? {
        let Ok(live) = dom.xml() else { continue };
        let Ok(live_info) = parse_domain(live.as_bytes(), ns) else {
            continue;
        };
        // Every domain whose element carries something here: a TPM, and
        // (with `nvram_without_tpm`) a UEFI domain without one.
        let Ok(carried_now) = Carried::of(&ctx.paths, &ctx.config, &live_info) else {
            continue;
        };
        if carried_now.is_empty() {
            continue;
        }
        let config_info = if dom.persistent {
            dom.inactive_xml()
                .ok()
                .and_then(|x| parse_domain(x.as_bytes(), ns).ok())
        } else {
            None
        };
        let holder = config_info.as_ref().unwrap_or(&live_info);
        let meta = header(holder);
        // Compared over the sections the domain carries here, on the local
        // state by one rule with `show` and `watch` (`Carried::read_local`).
        let (tpm, nvram) = carried_now.sections();
        let running = Running::from(Some(dom.active));
        let local = carried_now
            .read_local(
                &host,
                &dom.uuid,
                (tpm, nvram),
                running,
                ctx.config.max_file_size,
            )
            .ok()
            .flatten();
        let local_digest = local.as_ref().map(|s| s.digest());
        let declared = |i: &DomainInfo| {
            i.metadata
                .as_ref()
                .filter(|el| read_header(el).is_ok())
                .and_then(|el| declared_digest(el, tpm, nvram))
        };
        let mut copies = Vec::new();
        if dom.active {
            copies.push(declared(&live_info));
        }
        if let Some(c) = &config_info {
            copies.push(declared(c));
        }
        // No local state yet (never started): nothing to be out of sync with.
        let in_sync = local_digest.is_none() || copies.iter().all(|d| *d == local_digest);
        let entry = daemon
            .as_ref()
            .and_then(|d| d.domains.get(dom.uuid.as_str()));
        let since = if in_sync {
            None
        } else {
            // The daemon's first sighting, else the local file's change time
            // (a lower bound: the state changed then at the latest).
            entry
                .and_then(|e| e.out_of_sync_since.as_deref())
                .and_then(parse_time)
                .or_else(|| {
                    let (version, location) = carried_now.tpm.as_ref()?;
                    location.modified(*version)
                })
                .or_else(|| Some(SystemTime::now()))
        };
        let out_of_sync_secs = since.map(secs_since);
        let stored = meta.as_ref().map(|(p, _)| p.stored.clone());
        rows.push(Row {
            domain: dom.name.as_str().to_owned(),
            uuid: dom.uuid.to_string(),
            running: dom.active,
            persistent: dom.persistent,
            generation: meta.as_ref().map(|(p, _)| p.generation),
            digest: meta.as_ref().map(|(_, d)| d.hex()),
            age_secs: stored.as_deref().and_then(parse_time).map(secs_since),
            stored,
            local_digest: local_digest.map(|d| d.hex()),
            in_sync,
            out_of_sync_since: since.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            out_of_sync_secs,
            pending: entry.is_some_and(|e| e.pending),
            last_error: entry.and_then(|e| e.last_error.clone()),
            alert: out_of_sync_secs.is_some_and(|s| s > max_lag),
        });
    }
    rows.sort_by(|a, b| a.domain.cmp(&b.domain));
    let late: Vec<String> = rows
        .iter()
        .filter(|r| r.alert)
        .map(|r| DomainName::new(r.domain.as_str()).to_string())
        .collect();
    let failure = (!late.is_empty()).then(|| {
        CliError::OutOfSync(format!(
            "out of sync for more than {max_lag} s: {}",
            late.join(", ")
        ))
    });
    let disk_used_bytes = match crate::fs::HostData::new(&ctx.paths).scan_domains() {
        Ok(d) => Some(d.iter().map(|x| x.bytes).sum()),
        Err(e) => {
            log::warn!("disk used unknown: {e}");
            None
        }
    };
    let pending_stores = match crate::fs::HostData::new(&ctx.paths).list_pending() {
        Ok(p) => Some(
            p.into_iter()
                .map(|p| PendingRow {
                    domain: rows
                        .iter()
                        .find(|r| r.uuid == p.uuid.as_str())
                        .map(|r| r.domain.clone()),
                    uuid: p.uuid.to_string(),
                    digest: p.digest.hex(),
                    since: humantime::format_rfc3339_seconds(p.since).to_string(),
                    age_secs: secs_since(p.since),
                })
                .collect(),
        ),
        Err(e) => {
            log::warn!("pending stores unknown: {e}");
            None
        }
    };
    let report = Report {
        pending_stores,
        daemon,
        max_lag_secs: max_lag,
        domains: rows,
        error: failure.as_ref().map(|e| e.json()["error"].clone()),
        disk_used_bytes,
        max_state_dir_bytes: ctx.config.max_state_dir_bytes,
    };
    if args.json {
        crate::outln!(
            "{}",
            crate::logging::json_safe(
                &serde_json::to_string_pretty(&report).expect("serializable")
            )
        );
        super::JSON_PRINTED.store(true, std::sync::atomic::Ordering::SeqCst);
    } else {
        print_table(&report);
    }
    match failure {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

fn ago(secs: Option<u64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s ago"),
        Some(s) if s < 7200 => format!("{}m ago", s / 60),
        Some(s) if s < 172_800 => format!("{}h ago", s / 3600),
        Some(s) => format!("{}d ago", s / 86400),
    }
}

fn print_table(r: &Report) {
    match &r.daemon {
        Some(d) => crate::say!(
            "watch daemon: running (pid {}, since {}){}",
            d.pid,
            d.started,
            d.libvirt_unreachable_since
                .as_deref()
                .map(|t| format!(", libvirt unreachable since {t}"))
                .unwrap_or_default()
        ),
        None => crate::say!("watch daemon: not running"),
    }
    crate::say!(
        "disk used: {} of max_state_dir_bytes {} (kept copies, backups, sync records)",
        r.disk_used_bytes
            .map_or("unknown".to_string(), |b| format!("{b} bytes")),
        r.max_state_dir_bytes
    );
    match &r.pending_stores {
        None => crate::say!("pending post-stop stores: unknown (our data dir is root's)"),
        Some(p) if p.is_empty() => crate::say!("pending post-stop stores: none"),
        Some(p) => {
            crate::say!(
                "pending post-stop stores: {} (the watch daemon or `virt-tpm-state sync --pending` completes them)",
                p.len()
            );
            for x in p {
                crate::say!(
                    "  {} ({}): digest {}, since {} ({})",
                    x.domain
                        .as_deref()
                        .map_or("?".to_string(), |d| DomainName::new(d).to_string()),
                    x.uuid,
                    &x.digest[..12],
                    x.since,
                    ago(Some(x.age_secs))
                );
            }
        }
    }
    crate::say!(
        "{:<24} {:<8} {:>5} {:<14} {:<28} {:<8}",
        "DOMAIN",
        "STATE",
        "GEN",
        "STORED",
        "LOCAL",
        "PENDING"
    );
    for row in &r.domains {
        let sync = if row.local_digest.is_none() {
            "no local state".to_string()
        } else if row.in_sync {
            "in sync".to_string()
        } else {
            format!(
                "OUT OF SYNC {}{}",
                ago(row.out_of_sync_secs).trim_end_matches(" ago"),
                if row.alert { " (!)" } else { "" }
            )
        };
        crate::say!(
            "{:<24} {:<8} {:>5} {:<14} {:<28} {:<8}",
            row.domain,
            if row.running { "running" } else { "shut off" },
            row.generation.map_or("-".into(), |g| g.to_string()),
            ago(row.age_secs),
            sync,
            if row.pending { "yes" } else { "no" }
        );
        if let Some(e) = &row.last_error {
            crate::say!("  last error: {e}");
        }
    }
}
