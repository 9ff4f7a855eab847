//! What every libvirt-speaking use case (the CLI's commands, the store, the
//! watch daemon) works with: where things are, the configuration, which
//! libvirt; and the two facts an element's provenance records about the
//! store that wrote it (this host, now), read here so the store plan stays
//! pure.

use crate::config::Config;
use crate::paths::Paths;

/// Where things are, the configuration and the libvirt connection to use.
pub(crate) struct Ctx {
    pub(crate) paths: Paths,
    pub(crate) config: Config,
    pub(crate) uri: String,
    pub(crate) readonly: bool,
}

/// This host's name, as an element's `host` records it.
pub(crate) fn this_host() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Now, as an element's `stored` records it (RFC 3339, UTC, seconds).
pub(crate) fn now_stamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
