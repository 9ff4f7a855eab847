//! The `prepare` use case: restore the metadata state (or put the kept copy
//! back) into the state dir libvirt is about to use. The hook runs it on
//! `prepare begin`; `virt-tpm-state restore` runs the very same code for a
//! stopped domain. Never speaks to libvirt.
//!
//! Three steps, each in its own module: `gather` (the element's side, then
//! under the lock the local side), `decision::decide` (pure), `apply` (the
//! journaled write). Errors carry the VM's name, attached once here.

mod apply;
mod error;
mod gather;
mod report;

pub use error::{ErrorKind, RestoreError};
pub(crate) use gather::el_is_sealed;
pub(crate) use report::{Outcome, PrepareReport};

use crate::carried::Carried;
use crate::config::Config;
use crate::decision::{decide, Decision, DecisionInput, Refusal, Why};
use crate::domain::{parse_domain, DomainInfo};
use crate::format::MetadataState;
use crate::fs::{DomainLock, HostData, NvramLocation, StateLocation};
use crate::name::DomainName;
use crate::paths::Paths;
use crate::state::{DomainUuid, MachineState};
use apply::{fault, Apply};
use gather::{Element, Found, Local};
use std::time::Duration;

/// Options that differ between the hook and the CLI.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PrepareOptions {
    /// `restore --force`: the metadata wins even over a newer local state.
    pub(crate) force_metadata: bool,
}

/// Runs the decision rule for the domain in `xml` and carries it out.
/// Everything is validated before the first write.
pub(crate) fn prepare(
    paths: &Paths,
    config: &Config,
    xml: &[u8],
    options: PrepareOptions,
) -> Result<PrepareReport, RestoreError> {
    let info = parse_domain(xml, &config.namespace)?;
    prepare_domain(paths, config, &info, options)
}

pub(crate) fn prepare_domain(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    options: PrepareOptions,
) -> Result<PrepareReport, RestoreError> {
    prepare_held(paths, config, info, options, None)
}

/// [`prepare_domain`] for a caller that already holds the domain's lock
/// and read `info` under it (`restore DOMAIN`): no `store` can change the
/// element between that read and the decision, so a definition read just
/// before a store finished is never taken for a new one.
pub(crate) fn prepare_domain_locked(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    options: PrepareOptions,
    lock: &DomainLock,
) -> Result<PrepareReport, RestoreError> {
    assert_eq!(lock.uuid(), &info.uuid, "the lock held is another domain's");
    prepare_held(paths, config, info, options, Some(lock))
}

/// The boundary: the domain's name enters here, and joins any error here.
fn prepare_held(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    options: PrepareOptions,
    held: Option<&DomainLock>,
) -> Result<PrepareReport, RestoreError> {
    let name = info.name.clone();
    let prepare = Prepare {
        paths,
        config,
        info,
        options,
        name: &name,
    };
    prepare.run(held).map_err(|kind| kind.named(name.clone()))
}

/// One `prepare` of one domain.
struct Prepare<'a> {
    paths: &'a Paths,
    config: &'a Config,
    info: &'a DomainInfo,
    options: PrepareOptions,
    name: &'a DomainName,
}

impl Prepare<'_> {
    /// Gather, decide, apply. `held`: the caller holds the domain's lock.
    fn run(&self, held: Option<&DomainLock>) -> Result<PrepareReport, ErrorKind> {
        let (info, host) = (self.info, HostData::new(self.paths));
        if info.metadata.is_none() {
            return self.without_element(&host, held);
        }
        let element = match gather::element(self.paths, self.config, info)? {
            Found::NotOurs(why) => return Ok(self.report(Outcome::NotOurs(why))),
            Found::Element(e) => e,
        };
        let _lock = self.lock(&host, held)?;
        fault("restore.locked")?;
        self.tidy(&host, &element.carried)?;
        let local = gather::local(&host, info, &element, self.config.max_file_size)?;
        let decision = self.decide(&element, &local);
        let apply = Apply {
            paths: self.paths,
            config: self.config,
            host: &host,
            name: self.name,
            uuid: &info.uuid,
            element: &element,
        };
        let outcome = apply::apply(&apply, decision, &local)?;
        self.consume_revert(&host, &element.metadata, &local)?;
        Ok(self.report(outcome))
    }

    /// An XML without the element (a manager rolling back) still must not
    /// start a half-restored state: finish an interrupted restore.
    fn without_element(
        &self,
        host: &HostData,
        held: Option<&DomainLock>,
    ) -> Result<PrepareReport, ErrorKind> {
        if host.has_intent(&self.info.uuid)? {
            let carried = Carried::of(self.paths, self.config, self.info)?;
            let _lock = self.lock(host, held)?;
            apply::finish_intent(self.paths, host, &self.info.uuid, self.name, &carried)?;
        }
        Ok(self.report(Outcome::NotOurs(
            "no virt-tpm-state element in the metadata",
        )))
    }

    /// The domain's lock, unless the caller holds it (flock is per open
    /// file: taking it again here would wait for ourselves).
    fn lock(
        &self,
        host: &HostData,
        held: Option<&DomainLock>,
    ) -> Result<Option<DomainLock>, ErrorKind> {
        if held.is_some() {
            return Ok(None);
        }
        let timeout = Duration::from_secs(self.config.lock_timeout_secs);
        Ok(Some(host.lock(&self.info.uuid, timeout)?))
    }

    /// Under the lock, before reading L: what an interrupted earlier run
    /// left (leftovers, a restore's intent) is cleared or finished.
    fn tidy(&self, host: &HostData, carried: &Carried) -> Result<(), ErrorKind> {
        let uuid = &self.info.uuid;
        let tpm = carried.tpm.as_ref().map(|(_, l)| l);
        remove_leftovers(host, uuid, tpm, carried.nvram.as_ref());
        apply::finish_intent(self.paths, host, uuid, self.name, carried)
    }

    /// The decision rule on M, J, L and R; `restore --force` lets the
    /// element win where the rule keeps a newer local state.
    fn decide(&self, element: &Element, local: &Local) -> Decision {
        let decision = decide(&DecisionInput {
            domain_uuid: &self.info.uuid,
            metadata: Some((&element.metadata.provenance.uuid, element.target.digest())),
            journal: local.journal,
            live: local.live.as_ref().map(MachineState::digest),
            kept: local.kept.as_ref().map(MachineState::digest),
            incoming: local.incoming,
            revert: local.revert(element),
            policy: self.config.on_conflict,
        });
        match decision {
            Decision::Nothing(Why::LocalNewer)
            | Decision::RestoreKept(Why::LocalNewer)
            | Decision::Refuse(Refusal::Conflict { .. })
                if self.options.force_metadata =>
            {
                Decision::RestoreMetadata {
                    backup_local: local.live.is_some() || local.kept.is_some(),
                    why: Why::MetadataNewer,
                }
            }
            decision => decision,
        }
    }

    /// A revert intent is consumed by the first start after it, whether it
    /// named this element or not (a start with another element means the
    /// definition moved on since the revert).
    fn consume_revert(
        &self,
        host: &HostData,
        m: &MetadataState,
        local: &Local,
    ) -> Result<(), ErrorKind> {
        let uuid = &self.info.uuid;
        if local.stopped_by_revert {
            host.clear_reverted(uuid)?;
        }
        let Some(r) = &local.revert_intent else {
            return Ok(());
        };
        host.clear_revert(uuid)?;
        if r.digest != m.digest {
            log::info!(
                "VM {} ({uuid}): the revert to snapshot {} (element {}) was not for the element this start carries ({}); dropped it",
                self.name,
                DomainName::new(r.snapshot.as_str()),
                r.digest.short(),
                m.digest.short()
            );
        }
        Ok(())
    }

    fn report(&self, outcome: Outcome) -> PrepareReport {
        PrepareReport {
            name: self.name.clone(),
            uuid: self.info.uuid.clone(),
            outcome,
        }
    }
}

/// The reader rules that depend on the domain (docs/FORMAT.md §4, "Reader
/// rules"): the checks `verify`, `show --check` and `extract` apply to a
/// decoded element, in the hook's order and with its errors (so its exit
/// codes): the TPM version against the domain's emulated TPM, swtpm's own
/// encryption against `<encryption secret=…>`, then the uuid binding (a
/// clone, exit 5). `domain_bound` is false for a bare element (no domain to
/// compare with): then nothing here applies.
pub fn reader_check(
    info: &DomainInfo,
    m: &MetadataState,
    namespace: &str,
    domain_bound: bool,
) -> Result<(), RestoreError> {
    if !domain_bound {
        return Ok(());
    }
    gather::reader_rules(info, m, namespace).map_err(|kind| kind.named(info.name.clone()))
}

/// Finishes an interrupted restore of the domain in `info` (see
/// `apply::finish_intent`), for callers outside a `prepare` (the hook's
/// `stopped`, `store`, the pending-store path). Call with the lock held.
pub(crate) fn finish_intent(
    paths: &Paths,
    host: &HostData,
    info: &DomainInfo,
    carried: &Carried,
) -> Result<(), RestoreError> {
    let name = info.name.clone();
    apply::finish_intent(paths, host, &info.uuid, &name, carried).map_err(|kind| kind.named(name))
}

/// Removes what an interrupted earlier run left beside the state dir, the
/// VARS file and in our own data for `uuid`. Call with the lock held.
pub(crate) fn remove_leftovers(
    host: &HostData,
    uuid: &DomainUuid,
    tpm: Option<&StateLocation>,
    nvram: Option<&NvramLocation>,
) {
    if let Some(l) = tpm {
        l.remove_leftovers();
    }
    if let Some(l) = nvram {
        l.remove_leftovers();
    }
    host.remove_leftovers(uuid);
}
