//! `store` and `adopt`: local state -> domain metadata, through libvirt.

//! (The store itself is the library's [`crate::store`]; this is the
//! command around it: arguments, report, exit.)

use super::{CliError, Ctx, StoreArgs, SyncArgs};
use crate::context::{now_stamp, this_host};
use crate::domain::parse_domain;
use crate::envelope::os_random;
use crate::format::{decode, encode, DecodeLimits, Protection, Provenance, Style};
use crate::fs::{load_keyring, load_recipients, recipients_dir, HostData};
use crate::libvirt::{DomainHandle, Libvirt, LibvirtError};
use crate::name::DomainName;
use crate::store::pending::{self, Sweep};
use crate::store::plan::Targets;
use crate::store::{check_has_definition, store_domain, StoreDone, StoreError, StoreOptions};
use std::time::{Duration, Instant};

/// How long `store --after-stop` waits for libvirt to finish stopping.
const AFTER_STOP_WAIT: Duration = Duration::from_secs(120);

#[derive(serde::Serialize)]
struct StoreResult<'a> {
    domain: &'a str,
    uuid: &'a str,
    result: &'static str,
    generation: u64,
    digest: String,
    size: usize,
    element_bytes: usize,
    live: bool,
    config: bool,
}

pub(crate) fn store(ctx: &Ctx, args: &StoreArgs) -> Result<(), CliError> {
    if args.after_stop {
        // Started detached by the hook: leave libvirtd's session.
        let _ = nix::unistd::setsid();
    }
    let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
    if args.after_stop {
        return after_stop(ctx, &lv, &args.domain);
    }
    if !ctx.readonly {
        // The next `store` completes what earlier post-stop stores could
        // not (a busy one is being completed by its owner: skipped).
        if let Err(e) = pending::complete_all(ctx, &lv, false) {
            log::warn!("pending stores: {e}");
        }
    }
    let dom = lv.domain(&args.domain)?;
    check_has_definition(&dom)?;
    let done = store_domain(
        ctx,
        &dom,
        StoreOptions {
            allow_plaintext: args.allow_plaintext,
            ..StoreOptions::default()
        },
    )?;
    report(args, &dom, &done)
}

/// `store --after-stop UUID`, started by the hook at `stopped end`: once
/// libvirt has let go of the domain, completes the store the hook recorded
/// as pending (the pending-store path, `super::pending`), then any other
/// pending store nobody is working on. Nothing recorded: someone completed
/// it already (or the state needed no store).
fn after_stop(ctx: &Ctx, lv: &Libvirt, domain: &str) -> Result<(), CliError> {
    let uuid = match lv.domain(domain) {
        Ok(mut dom) => {
            let name = dom.name.clone();
            wait_inactive(&mut dom, &name)?;
            if dom.shut_off_by_revert()? {
                // A snapshot revert stopped it: the definition is (or is
                // about to be) the snapshot's, and the state that stopped is
                // the one the revert replaces. Storing it (now or later, as
                // a pending store) would put it back over the snapshot's
                // element; it stays in the copy the hook kept.
                log::info!(
                    "VM {}: stopped by a snapshot revert; its final TPM state is not stored over the snapshot's (it stays in the kept copy)",
                    name
                );
                let host = HostData::new(&ctx.paths);
                let _lock =
                    host.lock(&dom.uuid, Duration::from_secs(ctx.config.lock_timeout_secs))?;
                host.clear_pending(&dom.uuid)?;
                return Ok(());
            }
            dom.uuid
        }
        // Gone (a transient domain once stopped): the pending path drops
        // the record; the kept copy is all there is.
        Err(LibvirtError::NoDomain(_)) => match crate::state::DomainUuid::parse(domain) {
            Some(u) => u,
            None => return Ok(()),
        },
        Err(e) => return Err(e.into()),
    };
    if pending::complete(ctx, lv, &uuid, true)?.is_none() {
        log::debug!("domain {uuid}: no pending store (completed by another run)");
    }
    if let Err(e) = pending::complete_all(ctx, lv, false) {
        log::warn!("pending stores: {e}");
    }
    Ok(())
}

fn report(args: &StoreArgs, dom: &DomainHandle, done: &StoreDone) -> Result<(), CliError> {
    let StoreDone {
        result,
        m,
        element_bytes,
        targets,
        state,
        line,
    } = done;
    let (result, element_bytes, targets) = (*result, *element_bytes, *targets);
    if args.json {
        let r = StoreResult {
            domain: dom.name.as_str(),
            uuid: dom.uuid.as_str(),
            result,
            generation: m.provenance.generation,
            digest: m.digest.hex(),
            size: state.total_size(),
            element_bytes,
            live: targets.live,
            config: targets.config,
        };
        crate::outln!(
            "{}",
            crate::logging::json_safe(&serde_json::to_string_pretty(&r).expect("serializable"))
        );
    } else {
        crate::say!("{line}");
    }
    Ok(())
}

fn wait_inactive(dom: &mut DomainHandle, name: &DomainName) -> Result<(), CliError> {
    let start = Instant::now();
    loop {
        dom.refresh()?;
        if !dom.active {
            return Ok(());
        }
        if start.elapsed() > AFTER_STOP_WAIT {
            log::warn!(
                "VM {}: still running {}s after the stop; storing nothing",
                name,
                AFTER_STOP_WAIT.as_secs()
            );
            return Err(CliError::Running(name.to_string()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Re-stamps an element that names another domain (a deliberate clone) with
/// this domain's UUID, as a new generation over it.
pub(crate) fn adopt(ctx: &Ctx, domain: &str) -> Result<(), CliError> {
    let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
    let dom = lv.domain(domain)?;
    let name = dom.name.clone();
    let xml = if dom.persistent {
        dom.inactive_xml()?
    } else {
        dom.xml()?
    };
    let info = parse_domain(xml.as_bytes(), &ctx.config.namespace)?;
    let el = info.metadata.as_ref().ok_or_else(|| {
        CliError::NoElement(format!("VM {}: no TPM state element to adopt", name))
    })?;
    let keys = load_keyring(&ctx.paths)?;
    let m = decode(
        el,
        DecodeLimits {
            max_file_size: ctx.config.max_file_size,
        },
        &keys,
    )
    .map_err(|source| CliError::InvalidElement {
        context: format!("VM {}", name),
        source,
    })?;
    if m.provenance.uuid == dom.uuid {
        crate::say!(
            "VM {}: the TPM state already belongs to this domain; nothing to do",
            name
        );
        return Ok(());
    }
    let provenance = Provenance {
        uuid: dom.uuid.clone(),
        generation: m.provenance.generation.checked_add(1).ok_or_else(|| {
            CliError::from(StoreError::GenerationExhausted {
                name: name.clone(),
                generation: m.provenance.generation,
                ns: ctx.config.namespace.clone(),
            })
        })?,
        parent: Some(m.digest),
        stored: now_stamp(),
        host: this_host(),
    };
    // The seal is bound to the uuid: re-seal (for this domain's recipients,
    // else with the newest key) when the state was sealed; a plaintext state
    // stays plaintext.
    let mut fill = os_random;
    let was_sealed = !m.sealed_with.is_empty() || !m.sealed_for.is_empty();
    let recipients = load_recipients(&ctx.paths, dom.uuid.as_str())?;
    let protection = match (&recipients, keys.newest()) {
        (Some(set), _) if was_sealed => Protection::Recipients { set },
        (None, Some((key_id, key))) if was_sealed => Protection::Sealed {
            key_id,
            key,
            fill: &mut fill,
        },
        (None, None) if was_sealed => {
            return Err(CliError::Key(format!(
                "VM {}: no recipients in {} and no key to re-seal the adopted state with; nothing was changed",
                name,
                recipients_dir(&ctx.paths).display()
            )))
        }
        _ => Protection::Plain,
    };
    let element = encode(&m.state, &provenance, Style::ForSetMetadata, protection)
        .map_err(|e| CliError::Key(format!("VM {}: {e}; nothing was changed", name)))?;
    let targets = Targets {
        live: dom.active,
        config: dom.persistent,
    };
    dom.write_state_element(&element, &ctx.config.namespace, targets)?;
    crate::say!(
        "VM {}: adopted the TPM state of domain {} as generation {} (digest {})",
        name,
        m.provenance.uuid,
        provenance.generation,
        m.digest.short()
    );
    Ok(())
}
/// `virt-tpm-state sync --pending`: completes every pending post-stop store
/// (for hosts without the watch daemon; the packaged unit runs it at boot).
/// With none recorded it does not even connect to libvirt.
pub(crate) fn sync(ctx: &Ctx, args: &SyncArgs) -> Result<(), CliError> {
    let host = HostData::new(&ctx.paths);
    let mut sweep = if host.list_pending()?.is_empty() {
        Sweep::default()
    } else {
        let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
        pending::complete_all(ctx, &lv, true)?
    };
    let first_error = sweep.first_error.take().map(CliError::from);
    let error = first_error.as_ref().map(|e| e.json()["error"].clone());
    if args.json {
        let mut v = serde_json::to_value(&sweep).expect("serializable");
        v["error"] = error.unwrap_or(serde_json::Value::Null);
        crate::outln!(
            "{}",
            crate::logging::json_safe(&serde_json::to_string_pretty(&v).expect("serializable"))
        );
        super::JSON_PRINTED.store(true, std::sync::atomic::Ordering::SeqCst);
    } else {
        for c in &sweep.completed {
            crate::say!("{}", c.detail);
        }
        crate::say!(
            "{} pending store(s) completed, {} left",
            sweep.completed.len(),
            sweep.left.len()
        );
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
