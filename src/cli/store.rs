//! `store` and `adopt`: local state -> domain metadata, through libvirt.

use super::{CliError, Ctx, StoreArgs};
use crate::domain::{parse_domain, DomainInfo};
use crate::envelope::os_random;
use crate::format::{
    decode, encode, read_header, DecodeLimits, MetadataState, Protection, Provenance, Style,
    NAMESPACE_PREFIX,
};
use crate::fs::{keys_dir, load_keyring, load_recipients, recipients_dir, FsError, HostData};
use crate::libvirt::{DomainHandle, Libvirt, LibvirtError, Targets};
use crate::restore::{carried, shown_name, Carried};
use crate::state::{MachineState, TpmState};
use crate::swtpm::check_tpm_file;
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

pub fn store(ctx: &Ctx, args: &StoreArgs) -> Result<(), CliError> {
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
        if let Err(e) = super::pending::complete_all(ctx, &lv, false) {
            log::warn!("pending stores: {e}");
        }
    }
    let dom = lv.domain(&args.domain)?;
    if !dom.active && !dom.persistent {
        // A transient domain on its way out: no definition is left to hold
        // the state (the hook kept a copy).
        return Err(CliError::NoTpm {
            name: shown_name(&dom.name),
            why: "the domain is transient and not running; there is no definition to store into"
                .into(),
        });
    }
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
            wait_inactive(&mut dom)?;
            if dom.shut_off_by_revert()? {
                // A snapshot revert stopped it: the definition is (or is
                // about to be) the snapshot's, and the state that stopped is
                // the one the revert replaces. Storing it (now or later, as
                // a pending store) would put it back over the snapshot's
                // element; it stays in the copy the hook kept.
                log::info!(
                    "VM {}: stopped by a snapshot revert; its final TPM state is not stored over the snapshot's (it stays in the kept copy)",
                    shown_name(&dom.name)
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
    if super::pending::complete(ctx, lv, &uuid, true)?.is_none() {
        log::debug!("domain {uuid}: no pending store (completed by another run)");
    }
    if let Err(e) = super::pending::complete_all(ctx, lv, false) {
        log::warn!("pending stores: {e}");
    }
    Ok(())
}

/// How [`store_domain`] runs; the defaults are `store`'s.
#[derive(Default)]
pub struct StoreOptions {
    /// Store plaintext when this host has no key.
    pub allow_plaintext: bool,
    /// A TPM state the caller already saw settle (the watch daemon reads
    /// it twice a settle interval apart itself); `None`: read it here. The
    /// domain's VARS file, when carried, is read (settled) here either way.
    pub settled: Option<TpmState>,
    /// The watch daemon: a running domain's write always includes the live
    /// copy, so libvirt refuses it once the domain has stopped (the post-stop
    /// store owns that state); the sync journal is written only when it
    /// changes, and only while the state dir still holds the stored state.
    pub watch: bool,
    /// The caller holds the domain's lock (the pending-store path): take
    /// it nowhere here (a second flock of the same file would wait on it).
    pub lock_held: bool,
}

/// What [`store_domain`] did.
pub struct StoreDone {
    /// "stored" or "unchanged".
    pub result: &'static str,
    pub m: MetadataState,
    pub element_bytes: usize,
    pub targets: Targets,
    pub state: MachineState,
    /// The one-line summary `store` prints.
    pub line: String,
}

/// The store itself, on a looked-up domain: local state -> metadata (what
/// `store` does after finding the domain; the watch daemon calls it too).
pub fn store_domain(
    ctx: &Ctx,
    dom: &DomainHandle,
    opts: StoreOptions,
) -> Result<StoreDone, CliError> {
    let live_xml = dom.xml()?;
    let live_info = parse_domain(live_xml.as_bytes(), &ctx.config.namespace)?;
    let carried = carried_or_explain(ctx, &live_info)?;
    let host = HostData::new(&ctx.paths);
    if !dom.active && host.has_intent(&dom.uuid)? {
        // A restore interrupted on this stopped domain: finish it before
        // reading, so a store never takes TPM and VARS of two generations.
        let _lock = lock_unless_held(ctx, &host, &dom.uuid, opts.lock_held)?;
        crate::restore::finish_intent(&ctx.paths, &host, &live_info, &carried)?;
    }
    let state = match opts.settled {
        Some(tpm) => {
            // The TPM part settled already; settle the VARS file alone.
            let nvram_only = Carried {
                tpm: None,
                nvram: carried.nvram.clone(),
            };
            let vars = if nvram_only.is_empty() {
                None
            } else {
                read_settled(ctx, dom, &nvram_only, &host, &live_info, true)?.and_then(|s| s.nvram)
            };
            MachineState {
                tpm: Some(tpm),
                nvram: vars,
            }
        }
        None => read_settled(ctx, dom, &carried, &host, &live_info, false)?
            .expect("a missing state is an error unless asked otherwise"),
    };
    if let (Some(tpm), Some((_, location))) = (&state.tpm, &carried.tpm) {
        for f in tpm.files() {
            check_tpm_file(tpm.version, f).map_err(|e| CliError::NoTpm {
                name: shown_name(&dom.name),
                why: format!(
                    "the local state file {} is not a valid swtpm state ({e}); nothing was stored",
                    location.file_path(&f.name).display()
                ),
            })?;
        }
    }
    let digest = state.digest();

    // A stopped domain has one definition: the XML read above is it.
    let config_xml = match (dom.persistent, dom.active) {
        (true, true) => Some(dom.inactive_xml()?),
        (true, false) => Some(live_xml.clone()),
        (false, _) => None,
    };
    let config_info = match &config_xml {
        Some(x) => Some(parse_domain(x.as_bytes(), &ctx.config.namespace)?),
        None => None,
    };
    let limits = DecodeLimits {
        max_file_size: ctx.config.max_file_size,
    };
    let keys = load_keyring(&ctx.paths)?;
    let decoded = |i: &DomainInfo| i.metadata.as_ref().map(|el| decode(el, limits, &keys));
    let holds = |i: &DomainInfo| matches!(decoded(i), Some(Ok(m)) if m.digest == digest);
    let config_needs = config_info.as_ref().is_some_and(|c| !holds(c));
    let targets = Targets {
        live: dom.active && (!holds(&live_info) || (opts.watch && config_needs)),
        config: config_needs,
    };
    let element_holder = config_info.as_ref().unwrap_or(&live_info);
    if !dom.active {
        if let Some(done) = revert_pending(&host, dom, element_holder, &state, decoded)? {
            return Ok(done);
        }
    }

    // J and the kept copy, once the metadata holds `state` (both paths below).
    let record = || {
        record_synced(
            ctx,
            &host,
            dom,
            &state,
            opts.watch.then_some(&carried),
            opts.lock_held,
        )
    };
    if !targets.any() {
        // Every copy that exists holds this digest (an active domain has a
        // live copy, a persistent one a config copy; one of them is true).
        let Some(Ok(m)) = decoded(element_holder) else {
            unreachable!("no target to write, yet the definition does not hold the digest")
        };
        if !opts.watch || host.read_synced(&dom.uuid)? != Some(digest) {
            record()?;
        }
        return Ok(StoreDone {
            line: format!(
                "VM {}: unchanged (generation {}, digest {}): the metadata already holds this state",
                shown_name(&dom.name),
                m.provenance.generation,
                digest.short()
            ),
            result: "unchanged",
            m,
            element_bytes: 0,
            targets,
            state,
        });
    }

    // Keep one provenance for one digest: if a copy (live or config) already
    // holds this state, the other gets the very same element.
    let provenance = match [Some(&live_info), config_info.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|i| match decoded(i) {
            Some(Ok(m)) if m.digest == digest => Some(m.provenance),
            _ => None,
        }) {
        Some(p) => p,
        None => {
            // The chain continues from the element's own attributes, even
            // when its files cannot be opened here (another host's key).
            let header = element_holder.metadata.as_ref().map(read_header);
            let (generation, parent) = match header {
                Some(Ok((p, d))) => (
                    p.generation
                        .checked_add(1)
                        .ok_or_else(|| CliError::GenerationExhausted {
                            name: shown_name(&dom.name),
                            generation: p.generation,
                            ns: ctx.config.namespace.clone(),
                        })?,
                    Some(d),
                ),
                Some(Err(e)) => {
                    log::warn!(
                        "VM {}: replacing an invalid TPM state element ({e})",
                        shown_name(&dom.name)
                    );
                    (1, None)
                }
                None => (1, None),
            };
            Provenance {
                uuid: dom.uuid.clone(),
                generation,
                parent,
                stored: super::now_stamp(),
                host: super::this_host(),
            }
        }
    };
    // swtpm's own encryption makes the TPM blob ciphertext; a VARS file
    // beside it travels as it is (UEFI variables, no TPM secrets).
    let swtpm_encrypted = state
        .tpm
        .as_ref()
        .is_some_and(crate::swtpm::state_is_encrypted);
    let mut fill = os_random;
    // A recipient set, when configured, wins over host keys: new stores are
    // sealed for the hosts (and owners) named there.
    let recipients = load_recipients(&ctx.paths, dom.uuid.as_str())?;
    let sealed_for = recipients
        .as_ref()
        .map(|set| set.fingerprints())
        .unwrap_or_default();
    let (protection, sealed_with) = match (&recipients, keys.newest()) {
        (Some(set), _) => (Protection::Recipients { set }, Vec::new()),
        (None, Some((key_id, key))) => (
            Protection::Sealed {
                key_id,
                key,
                fill: &mut fill,
            },
            vec![key_id.clone()],
        ),
        (None, None) if opts.allow_plaintext || ctx.config.allow_plaintext || swtpm_encrypted => {
            (Protection::Plain, Vec::new())
        }
        (None, None) => {
            return Err(CliError::Key(format!(
                "VM {}: no key in {} and no recipients in {} to encrypt the TPM state with; nothing was stored. Name the hosts that may run it in recipients.d (`virt-tpm-state host-id` on each prints its recipient), or create a key with `virt-tpm-state keygen` (and copy it to every host that may run this VM), or allow plaintext (readable by anyone who can read the domain XML): --allow-plaintext, or allow_plaintext = true in the config",
                shown_name(&dom.name),
                keys_dir(&ctx.paths).display(),
                recipients_dir(&ctx.paths).display()
            )))
        }
    };
    let element = encode(&state, &provenance, Style::ForSetMetadata, protection).map_err(|e| {
        CliError::Key(format!(
            "VM {}: {e}; nothing was stored",
            shown_name(&dom.name)
        ))
    })?;
    let current = live_xml
        .len()
        .max(config_xml.as_ref().map_or(0, String::len));
    let old_element = element_holder
        .metadata
        .as_ref()
        .map_or(0, |_| approx_element_len(&live_xml));
    let total = current.saturating_sub(old_element) + element.len();
    if total as u64 > ctx.config.max_domain_xml_size {
        return Err(CliError::TooLarge {
            name: shown_name(&dom.name),
            element: element.len(),
            total,
            limit: ctx.config.max_domain_xml_size,
        });
    }
    store_fault("store.settled")?;
    dom.write_state_element(&element, &ctx.config.namespace, targets)?;
    store_fault("store.metadata_set")?;
    record()?;
    let m = MetadataState {
        provenance,
        digest,
        state: state.clone(),
        sealed_with,
        sealed_for,
        age_files: Vec::new(),
    };
    let where_ = match (targets.live, targets.config) {
        (true, true) => "live and config",
        (true, false) => "live",
        _ => "config",
    };
    let line = format!(
        "VM {}: stored generation {} (digest {}, {} bytes of state, {} bytes of XML) into the {where_} metadata",
        shown_name(&dom.name),
        m.provenance.generation,
        digest.short(),
        state.total_size(),
        element.len()
    );
    Ok(StoreDone {
        result: "stored",
        m,
        element_bytes: element.len(),
        targets,
        state,
        line,
    })
}

/// A stopped domain with a snapshot revert pending (an intent, from
/// `snapshot revert` or the watch daemon): storing the local state now would
/// write the state the revert replaces over the snapshot's element (the
/// post-stop store of a running VM being reverted may even read the
/// definition from before the revert). Its next start restores the element
/// and backs the local state up; until then nothing is stored. That start
/// consumes the intent, whichever element it carries.
fn revert_pending(
    host: &HostData,
    dom: &DomainHandle,
    holder: &DomainInfo,
    state: &MachineState,
    decoded: impl Fn(&DomainInfo) -> Option<Result<MetadataState, crate::format::FormatError>>,
) -> Result<Option<StoreDone>, CliError> {
    let Some(r) = host.read_revert(&dom.uuid)? else {
        return Ok(None);
    };
    let Some(Ok(m)) = decoded(holder) else {
        return Ok(None);
    };
    if m.digest == r.digest && state.digest() == r.digest {
        return Ok(None);
    }
    Ok(Some(StoreDone {
        line: format!(
            "VM {}: not stored: a revert to snapshot {} (element {}) is pending; the next start restores that state and backs up the local one ({})",
            shown_name(&dom.name),
            shown_name(&r.snapshot),
            r.digest.short(),
            state.digest().short()
        ),
        result: "revert-pending",
        m,
        element_bytes: 0,
        targets: Targets {
            live: false,
            config: false,
        },
        state: state.clone(),
    }))
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
            domain: &dom.name,
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

/// Length of our element as it appears in `xml` (upper bound for the size
/// check): from its start tag to its end tag.
fn approx_element_len(xml: &str) -> usize {
    let Some(start) = xml.find(&format!("<{NAMESPACE_PREFIX}:state")) else {
        return 0;
    };
    let end_tag = format!("</{NAMESPACE_PREFIX}:state>");
    xml[start..].find(&end_tag).map_or(0, |e| e + end_tag.len())
}

/// What this host carries for the domain (TPM, VARS or both); an error
/// naming why when that is nothing.
fn carried_or_explain(ctx: &Ctx, info: &DomainInfo) -> Result<Carried, CliError> {
    let c = carried(&ctx.paths, &ctx.config, info)?;
    if !c.is_empty() {
        return Ok(c);
    }
    let nvram_hint = if info.os.nvram().is_some() && !ctx.config.nvram_without_tpm {
        " (its UEFI variables are carried only with a TPM, unless nvram_without_tpm = true)"
    } else {
        ""
    };
    Err(CliError::NoTpm {
        name: shown_name(&info.name),
        why: if info.tpms.is_empty() {
            format!("the domain has no <tpm> device; nothing to store{nvram_hint}")
        } else {
            format!("its <tpm> is not an emulated (swtpm) TPM; only emulator backends have state to store{nvram_hint}")
        },
    })
}

fn wait_inactive(dom: &mut DomainHandle) -> Result<(), CliError> {
    let start = Instant::now();
    loop {
        dom.refresh()?;
        if !dom.active {
            return Ok(());
        }
        if start.elapsed() > AFTER_STOP_WAIT {
            log::warn!(
                "VM {}: still running {}s after the stop; storing nothing",
                shown_name(&dom.name),
                AFTER_STOP_WAIT.as_secs()
            );
            return Err(CliError::Running(shown_name(&dom.name)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads the local state (the carried TPM state and VARS file together):
/// once for a stopped domain (from the live files, or the copy kept at stop
/// when the TPM dir is gone); for a running one, until two reads a settle
/// interval apart agree. A VARS file that does not exist yet (never started)
/// is stored without. `Ok(None)` only with `missing_ok`.
fn read_settled(
    ctx: &Ctx,
    dom: &DomainHandle,
    carried: &Carried,
    host: &HostData,
    info: &DomainInfo,
    missing_ok: bool,
) -> Result<Option<MachineState>, CliError> {
    let max = ctx.config.max_file_size;
    let missing = || CliError::NoTpm {
        name: shown_name(&dom.name),
        why: match (&carried.tpm, &carried.nvram) {
            (Some((_, l)), _) => format!(
                "no TPM state at {} yet; start the VM once so libvirt creates it",
                l.path().display()
            ),
            (None, Some(l)) => format!(
                "no UEFI variable store at {} yet; start the VM once so libvirt creates it",
                l.path().display()
            ),
            (None, None) => "nothing to store".to_string(),
        },
    };
    let read =
        || -> Result<Option<MachineState>, CliError> { Ok(carried.read_live(true, true, max)?) };
    let result = if !dom.active {
        match read()? {
            Some(s) => Some(s),
            None => host.read_kept_state(
                &info.uuid,
                carried.tpm_version(),
                carried.nvram.is_some(),
                max,
            )?,
        }
    } else {
        // swtpm rewrites a `<source type='file'>` state in place (mmap), so
        // a read may see it half-written: that is "still changing" (None
        // here), not a broken file.
        let read_running = || -> Result<Option<Option<MachineState>>, CliError> {
            match carried.read_live(true, true, max) {
                Ok(s) => Ok(Some(s)),
                Err(FsError::Linear { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        };
        let interval = Duration::from_millis(ctx.config.settle_interval_ms);
        let mut previous = read_running()?;
        let mut settled = None;
        for _ in 1..ctx.config.settle_attempts {
            std::thread::sleep(interval);
            let now = read_running()?;
            if let (Some(p), Some(n)) = (&previous, &now) {
                if n.as_ref().map(MachineState::digest) == p.as_ref().map(MachineState::digest) {
                    settled = now;
                    break;
                }
            }
            previous = now;
        }
        match settled {
            Some(s) => s,
            None => {
                return Err(CliError::StillChanging {
                    name: shown_name(&dom.name),
                    attempts: ctx.config.settle_attempts,
                    interval_ms: ctx.config.settle_interval_ms,
                })
            }
        }
    };
    match result {
        None if !missing_ok => Err(missing()),
        r => Ok(r),
    }
}

/// A fault point of the `fault-injection` test build (nothing otherwise).
fn store_fault(point: &'static str) -> Result<(), CliError> {
    crate::fault::point(point).map_err(|source| {
        CliError::from(crate::fs::FsError::Io {
            action: "continue at",
            path: std::path::PathBuf::from(point),
            source,
        })
    })
}

/// Records `J` (and the kept copy). With `still_at` (the watch daemon), only
/// when that state dir still holds `state` under the lock: a domain that
/// stopped meanwhile has a newer final state, which the hook kept and the
/// post-stop store records.
fn record_synced(
    ctx: &Ctx,
    host: &HostData,
    dom: &DomainHandle,
    state: &MachineState,
    still_at: Option<&Carried>,
    lock_held: bool,
) -> Result<(), CliError> {
    let _lock = lock_unless_held(ctx, host, &dom.uuid, lock_held)?;
    host.remove_leftovers(&dom.uuid);
    if let Some(carried) = still_at {
        let now = carried.read_live(true, true, ctx.config.max_file_size)?;
        if now.as_ref().map(MachineState::digest) != Some(state.digest()) {
            log::debug!(
                "VM {}: the state changed again while it was stored; the sync journal waits for the next store",
                shown_name(&dom.name)
            );
            return Ok(());
        }
    }
    crate::gc::enforce(
        &ctx.paths,
        &ctx.config,
        &dom.uuid,
        state.total_size() as u64,
    );
    host.record_sync(&dom.uuid, state)?;
    Ok(())
}

/// The domain's lock, unless the caller already holds it.
fn lock_unless_held(
    ctx: &Ctx,
    host: &HostData,
    uuid: &crate::state::DomainUuid,
    held: bool,
) -> Result<Option<crate::fs::DomainLock>, CliError> {
    if held {
        return Ok(None);
    }
    Ok(Some(host.lock(
        uuid,
        Duration::from_secs(ctx.config.lock_timeout_secs),
    )?))
}

/// Re-stamps an element that names another domain (a deliberate clone) with
/// this domain's UUID, as a new generation over it.
pub fn adopt(ctx: &Ctx, domain: &str) -> Result<(), CliError> {
    let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
    let dom = lv.domain(domain)?;
    let xml = if dom.persistent {
        dom.inactive_xml()?
    } else {
        dom.xml()?
    };
    let info = parse_domain(xml.as_bytes(), &ctx.config.namespace)?;
    let el = info.metadata.as_ref().ok_or_else(|| {
        CliError::NoElement(format!(
            "VM {}: no TPM state element to adopt",
            shown_name(&dom.name)
        ))
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
        context: format!("VM {}", shown_name(&dom.name)),
        source,
    })?;
    if m.provenance.uuid == dom.uuid {
        crate::say!(
            "VM {}: the TPM state already belongs to this domain; nothing to do",
            shown_name(&dom.name)
        );
        return Ok(());
    }
    let provenance = Provenance {
        uuid: dom.uuid.clone(),
        generation: m.provenance.generation.checked_add(1).ok_or_else(|| {
            CliError::GenerationExhausted {
                name: shown_name(&dom.name),
                generation: m.provenance.generation,
                ns: ctx.config.namespace.clone(),
            }
        })?,
        parent: Some(m.digest),
        stored: super::now_stamp(),
        host: super::this_host(),
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
                shown_name(&dom.name),
                recipients_dir(&ctx.paths).display()
            )))
        }
        _ => Protection::Plain,
    };
    let element =
        encode(&m.state, &provenance, Style::ForSetMetadata, protection).map_err(|e| {
            CliError::Key(format!(
                "VM {}: {e}; nothing was changed",
                shown_name(&dom.name)
            ))
        })?;
    let targets = Targets {
        live: dom.active,
        config: dom.persistent,
    };
    dom.write_state_element(&element, &ctx.config.namespace, targets)?;
    crate::say!(
        "VM {}: adopted the TPM state of domain {} as generation {} (digest {})",
        shown_name(&dom.name),
        m.provenance.uuid,
        provenance.generation,
        m.digest.short()
    );
    Ok(())
}
