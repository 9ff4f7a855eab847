//! The store use case around the pure [`super::plan`]: gather (the domain's
//! XML, live and inactive, through libvirt; the settled local state; keys
//! and recipients), plan, then apply (encode, size check, write, record J
//! and the kept copy).

use super::plan::{
    plan, Element, Keys, Nothing, Plan, PlanError, PlanInput, Protect, StorePlan, Targets, XmlSizes,
};
use crate::carried::Running;
use crate::carried::{carried, Carried};
use crate::context::{now_stamp, this_host, Ctx};
use crate::domain::{parse_domain, DomainInfo, DomainXmlError};
use crate::envelope::{os_random, Keyring};
use crate::format::{decode, encode, read_header, DecodeLimits, MetadataState, Protection, Style};
use crate::fs::{keys_dir, load_keyring, load_recipients, recipients_dir, FsError, HostData};
use crate::libvirt::{DomainHandle, LibvirtError};
use crate::name::DomainName;
use crate::recipients::RecipientSet;
use crate::restore::RestoreError;
use crate::state::{DomainUuid, MachineState, Sha256Sum, TpmState};
use crate::swtpm::check_tpm_file;
use std::time::Duration;

/// Every way a store fails (the CLI maps each to its exit code).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot read the domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("VM {name}: {why}")]
    NoTpm { name: DomainName, why: String },
    #[error("VM {name}: the TPM state is still changing after {attempts} reads {interval_ms} ms apart; try again when the guest is quieter, or stop the VM")]
    StillChanging {
        name: DomainName,
        attempts: u32,
        interval_ms: u64,
    },
    #[error("VM {name}: storing {element} bytes of TPM state would make the domain XML {total} bytes, over the limit of {limit} (max_domain_xml_size); nothing was written")]
    TooLarge {
        name: DomainName,
        element: usize,
        total: usize,
        limit: u64,
    },
    #[error("VM {name}: the metadata element's generation is {generation}, the largest there is; a store over it cannot count on, and nothing was written. Start a new chain: remove the element (virsh metadata {name} --uri {ns} --remove --config), then store again")]
    GenerationExhausted {
        name: DomainName,
        generation: u64,
        ns: String,
    },
    /// No key, no recipients, no plaintext permission; or sealing failed.
    #[error("{0}")]
    Key(String),
}

/// Why a stopped transient domain cannot be stored.
const NO_DEFINITION: &str =
    "the domain is transient and not running; there is no definition to store into";

/// Refuses a transient domain on its way out before any work: no
/// definition is left to hold the state (the hook kept a copy).
pub(crate) fn check_has_definition(dom: &DomainHandle) -> Result<(), StoreError> {
    if !dom.active && !dom.persistent {
        return Err(StoreError::NoTpm {
            name: dom.name.clone(),
            why: NO_DEFINITION.into(),
        });
    }
    Ok(())
}

/// How [`store_domain`] runs; the defaults are `store`'s.
#[derive(Default)]
pub(crate) struct StoreOptions {
    /// Store plaintext when this host has no key.
    pub(crate) allow_plaintext: bool,
    /// A TPM state the caller already saw settle (the watch daemon reads
    /// it twice a settle interval apart itself); `None`: read it here. The
    /// domain's VARS file, when carried, is read (settled) here either way.
    pub(crate) settled: Option<TpmState>,
    /// The watch daemon: a running domain's write always includes the live
    /// copy, so libvirt refuses it once the domain has stopped (the post-stop
    /// store owns that state); the sync journal is written only when it
    /// changes, and only while the state dir still holds the stored state.
    pub(crate) watch: bool,
    /// The caller holds the domain's lock (the pending-store path): take
    /// it nowhere here (a second flock of the same file would wait on it).
    pub(crate) lock_held: bool,
}

/// What [`store_domain`] did.
pub(crate) struct StoreDone {
    /// "stored", "unchanged" or "revert-pending".
    pub(crate) result: &'static str,
    pub(crate) m: MetadataState,
    pub(crate) element_bytes: usize,
    pub(crate) targets: Targets,
    pub(crate) state: MachineState,
    /// The one-line summary `store` prints.
    pub(crate) line: String,
}

/// The store itself, on a looked-up domain: local state -> metadata (what
/// `store` does after finding the domain; the pending-store path, `snapshot
/// create` and the watch daemon call it too). Gather (XML, local state,
/// keys), [`plan`], then write and record.
pub(crate) fn store_domain(
    ctx: &Ctx,
    dom: &DomainHandle,
    opts: StoreOptions,
) -> Result<StoreDone, StoreError> {
    let name = dom.name.clone();
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
    let reader = Reader {
        ctx,
        dom,
        name: &name,
        host: &host,
        info: &live_info,
    };
    let state = reader.local_state(&carried, opts.settled)?;
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
    let keys = load_keyring(&ctx.paths)?;
    let limits = DecodeLimits {
        max_file_size: ctx.config.max_file_size,
    };
    let element = |i: &DomainInfo| element_of(i, limits, &keys);
    let live_el = dom.active.then(|| element(&live_info));
    let config_el = config_info.as_ref().map(element);
    // A recipient set, when configured, wins over host keys: new stores are
    // sealed for the hosts (and owners) named there.
    let recipients = load_recipients(&ctx.paths, dom.uuid.as_str())?;
    let revert = if dom.active {
        None
    } else {
        host.read_revert(&dom.uuid)?
    };
    let (now, this_host) = (now_stamp(), this_host());
    let planned = plan(&PlanInput {
        uuid: &dom.uuid,
        live: live_el.as_ref(),
        config: config_el.as_ref(),
        state: &state,
        digest,
        revert: revert.as_ref(),
        keys: Keys {
            recipients: recipients.is_some(),
            newest_key: keys.newest().map(|(id, _)| id),
            allow_plaintext: opts.allow_plaintext || ctx.config.allow_plaintext,
        },
        watch: opts.watch,
        now: &now,
        host: &this_host,
    })
    .map_err(|e| plan_error(ctx, &name, e))?;

    // J and the kept copy, once the metadata holds `state`.
    let record = || {
        record_synced(
            ctx,
            &host,
            dom,
            &name,
            &state,
            opts.watch.then_some(&carried),
            opts.lock_held,
        )
    };
    let p = match planned {
        Plan::Nothing(nothing) => {
            if matches!(nothing, Nothing::Unchanged(_))
                && (!opts.watch || host.read_synced(&dom.uuid)? != Some(digest))
            {
                record()?;
            }
            let (result, m, line) = nothing_said(&name, nothing, digest);
            return Ok(StoreDone {
                result,
                m,
                element_bytes: 0,
                targets: Targets::NONE,
                state,
                line,
            });
        }
        Plan::Write(p) => p,
    };
    if let Some(e) = &p.replaces_invalid {
        log::warn!("VM {name}: replacing an invalid TPM state element ({e})");
    }
    let seal = Seal {
        keys: &keys,
        recipients: recipients.as_ref(),
    };
    let element = seal.encode(&name, &state, &p)?;
    let holder = config_info.as_ref().unwrap_or(&live_info);
    XmlSizes::of(
        &live_xml,
        config_xml.as_deref(),
        holder.metadata.is_some(),
        element.len(),
    )
    .check(ctx.config.max_domain_xml_size)
    .map_err(|total| StoreError::TooLarge {
        name: name.clone(),
        element: element.len(),
        total,
        limit: ctx.config.max_domain_xml_size,
    })?;
    store_fault("store.settled")?;
    dom.write_state_element(&element, &ctx.config.namespace, p.targets)?;
    store_fault("store.metadata_set")?;
    record()?;
    Ok(seal.stored(&name, state, p, element.len()))
}

/// What a store that wrote nothing says: its result, the element the
/// definition holds, its summary line.
fn nothing_said(
    name: &DomainName,
    nothing: Nothing<'_>,
    digest: Sha256Sum,
) -> (&'static str, MetadataState, String) {
    let (result, held, line) = match nothing {
        Nothing::RevertPending { held, intent } => (
            "revert-pending",
            held,
            format!(
                "VM {name}: not stored: a revert to snapshot {} (element {}) is pending; the next start restores that state and backs up the local one ({})",
                DomainName::from(intent.snapshot.as_str()),
                intent.digest.short(),
                digest.short()
            ),
        ),
        Nothing::Unchanged(held) => (
            "unchanged",
            held,
            format!(
                "VM {name}: unchanged (generation {}, digest {}): the metadata already holds this state",
                held.provenance.generation,
                digest.short()
            ),
        ),
    };
    (result, held.clone(), line)
}

/// The key material behind a plan's [`Protect`].
struct Seal<'a> {
    keys: &'a Keyring,
    recipients: Option<&'a RecipientSet>,
}

impl Seal<'_> {
    /// The element, as `virDomainSetMetadata` takes it.
    fn encode(
        &self,
        name: &DomainName,
        state: &MachineState,
        p: &StorePlan,
    ) -> Result<String, StoreError> {
        let mut fill = os_random;
        let protection = match (&p.protect, self.recipients, self.keys.newest()) {
            (Protect::Recipients, Some(set), _) => Protection::Recipients { set },
            (Protect::HostKey(_), _, Some((key_id, key))) => Protection::Sealed {
                key_id,
                key,
                fill: &mut fill,
            },
            (Protect::Plain, _, _) => Protection::Plain,
            _ => unreachable!("the plan protects only with what its input offered"),
        };
        encode(state, &p.provenance, Style::ForSetMetadata, protection)
            .map_err(|e| StoreError::Key(format!("VM {name}: {e}; nothing was stored")))
    }

    /// What a store that wrote `element_bytes` of element says.
    fn stored(
        &self,
        name: &DomainName,
        state: MachineState,
        p: StorePlan,
        element_bytes: usize,
    ) -> StoreDone {
        let digest = state.digest();
        let line = format!(
            "VM {name}: stored generation {} (digest {}, {} bytes of state, {element_bytes} bytes of XML) into the {} metadata",
            p.provenance.generation,
            digest.short(),
            state.total_size(),
            p.targets.describe()
        );
        StoreDone {
            result: "stored",
            m: MetadataState {
                provenance: p.provenance,
                digest,
                state: state.clone(),
                sealed_with: match p.protect {
                    Protect::HostKey(id) => vec![id],
                    _ => Vec::new(),
                },
                sealed_for: self
                    .recipients
                    .map(|set| set.fingerprints())
                    .unwrap_or_default(),
                age_files: Vec::new(),
            },
            element_bytes,
            targets: p.targets,
            state,
            line,
        }
    }
}

/// What a copy's `<metadata>` holds, as the plan sees it.
fn element_of(info: &DomainInfo, limits: DecodeLimits, keys: &crate::envelope::Keyring) -> Element {
    let Some(el) = &info.metadata else {
        return Element::Absent;
    };
    match decode(el, limits, keys) {
        Ok(m) => Element::Opened(m),
        Err(_) => match read_header(el) {
            Ok((provenance, digest)) => Element::Unopened { provenance, digest },
            Err(e) => Element::Invalid(e),
        },
    }
}

/// A plan's refusal, in the words of the store's errors.
fn plan_error(ctx: &Ctx, name: &DomainName, e: PlanError) -> StoreError {
    match e {
        PlanError::NoDefinition => StoreError::NoTpm {
            name: name.clone(),
            why: NO_DEFINITION.into(),
        },
        PlanError::GenerationExhausted(generation) => StoreError::GenerationExhausted {
            name: name.clone(),
            generation,
            ns: ctx.config.namespace.clone(),
        },
        PlanError::NoProtection => StoreError::Key(format!(
            "VM {name}: no key in {} and no recipients in {} to encrypt the TPM state with; nothing was stored. Name the hosts that may run it in recipients.d (`virt-tpm-state host-id` on each prints its recipient), or create a key with `virt-tpm-state keygen` (and copy it to every host that may run this VM), or allow plaintext (readable by anyone who can read the domain XML): --allow-plaintext, or allow_plaintext = true in the config",
            keys_dir(&ctx.paths).display(),
            recipients_dir(&ctx.paths).display()
        )),
    }
}

/// What this host carries for the domain (TPM, VARS or both); an error
/// naming why when that is nothing.
fn carried_or_explain(ctx: &Ctx, info: &DomainInfo) -> Result<Carried, StoreError> {
    let c = carried(&ctx.paths, &ctx.config, info)?;
    if !c.is_empty() {
        return Ok(c);
    }
    let nvram_hint = if info.os.nvram().is_some() && !ctx.config.nvram_without_tpm {
        " (its UEFI variables are carried only with a TPM, unless nvram_without_tpm = true)"
    } else {
        ""
    };
    Err(StoreError::NoTpm {
        name: info.name.clone(),
        why: if info.tpms.is_empty() {
            format!("the domain has no <tpm> device; nothing to store{nvram_hint}")
        } else {
            format!("its <tpm> is not an emulated (swtpm) TPM; only emulator backends have state to store{nvram_hint}")
        },
    })
}

/// Reads a domain's local state for a store.
struct Reader<'a> {
    ctx: &'a Ctx,
    dom: &'a DomainHandle,
    name: &'a DomainName,
    host: &'a HostData,
    info: &'a DomainInfo,
}

impl Reader<'_> {
    /// The local state to store: read (settled) here, or the TPM part the
    /// caller saw settle with the VARS file read here; its TPM files
    /// checked as swtpm states.
    fn local_state(
        &self,
        carried: &Carried,
        settled: Option<TpmState>,
    ) -> Result<MachineState, StoreError> {
        let state = match settled {
            Some(tpm) => {
                // The TPM part settled already; settle the VARS file alone.
                let nvram_only = Carried {
                    tpm: None,
                    nvram: carried.nvram.clone(),
                };
                let vars = if nvram_only.is_empty() {
                    None
                } else {
                    self.read_settled(&nvram_only, true)?.and_then(|s| s.nvram)
                };
                MachineState {
                    tpm: Some(tpm),
                    nvram: vars,
                }
            }
            None => self
                .read_settled(carried, false)?
                .expect("a missing state is an error unless asked otherwise"),
        };
        if let (Some(tpm), Some((_, location))) = (&state.tpm, &carried.tpm) {
            for f in tpm.files() {
                check_tpm_file(tpm.version, f).map_err(|e| StoreError::NoTpm {
                    name: self.name.clone(),
                    why: format!(
                        "the local state file {} is not a valid swtpm state ({e}); nothing was stored",
                        location.file_path(&f.name).display()
                    ),
                })?;
            }
        }
        Ok(state)
    }

    /// Reads the local state (the carried TPM state and VARS file together):
    /// once for a stopped domain (from the live files, or the copy kept at
    /// stop when the TPM dir is gone); for a running one, until two reads a
    /// settle interval apart agree. A VARS file that does not exist yet
    /// (never started) is stored without. `Ok(None)` only with `missing_ok`.
    fn read_settled(
        &self,
        carried: &Carried,
        missing_ok: bool,
    ) -> Result<Option<MachineState>, StoreError> {
        let ctx = self.ctx;
        let max = ctx.config.max_file_size;
        let result = if !self.dom.active {
            carried.read_local(self.host, &self.info.uuid, (true, true), Running::No, max)?
        } else {
            self.read_running(carried)?
        };
        match result {
            None if !missing_ok => Err(StoreError::NoTpm {
                name: self.name.clone(),
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
            }),
            r => Ok(r),
        }
    }

    /// A running domain's state, once two reads a settle interval apart agree.
    fn read_running(&self, carried: &Carried) -> Result<Option<MachineState>, StoreError> {
        let config = &self.ctx.config;
        // swtpm rewrites a `<source type='file'>` state in place (mmap), so
        // a read may see it half-written: that is "still changing" (None
        // here), not a broken file.
        let read = || -> Result<Option<Option<MachineState>>, StoreError> {
            match carried.read_live(true, true, config.max_file_size) {
                Ok(s) => Ok(Some(s)),
                Err(FsError::Linear { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        };
        let interval = Duration::from_millis(config.settle_interval_ms);
        let mut previous = read()?;
        for _ in 1..config.settle_attempts {
            std::thread::sleep(interval);
            let now = read()?;
            if let (Some(p), Some(n)) = (&previous, &now) {
                if n.as_ref().map(MachineState::digest) == p.as_ref().map(MachineState::digest) {
                    return Ok(now.flatten());
                }
            }
            previous = now;
        }
        Err(StoreError::StillChanging {
            name: self.name.clone(),
            attempts: config.settle_attempts,
            interval_ms: config.settle_interval_ms,
        })
    }
}

/// A fault point of the `fault-injection` test build (nothing otherwise).
fn store_fault(point: &'static str) -> Result<(), StoreError> {
    crate::fault::point(point).map_err(|source| {
        StoreError::from(FsError::Io {
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
    name: &DomainName,
    state: &MachineState,
    still_at: Option<&Carried>,
    lock_held: bool,
) -> Result<(), StoreError> {
    let _lock = lock_unless_held(ctx, host, &dom.uuid, lock_held)?;
    host.remove_leftovers(&dom.uuid);
    if let Some(carried) = still_at {
        let now = carried.read_live(true, true, ctx.config.max_file_size)?;
        if now.as_ref().map(MachineState::digest) != Some(state.digest()) {
            log::debug!(
                "VM {name}: the state changed again while it was stored; the sync journal waits for the next store"
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
    uuid: &DomainUuid,
    held: bool,
) -> Result<Option<crate::fs::DomainLock>, StoreError> {
    if held {
        return Ok(None);
    }
    Ok(Some(host.lock(
        uuid,
        Duration::from_secs(ctx.config.lock_timeout_secs),
    )?))
}
