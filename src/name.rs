//! A domain's name, attached once where it enters (the domain XML, the
//! command line, libvirt) and shown safely everywhere after.
//!
//! libvirt accepts almost any character in a name, and whoever writes a
//! domain's XML chooses it: a name with a newline or a bidi override could
//! forge a log line or hide a message's end. So the type's `Display` (and
//! `Debug`, which panics and `{:?}` use) is the only way a name reaches text:
//! quoted, cut at [`SHOWN_CHARS`] characters, and escaped by the one rule in
//! [`crate::logging::escaped`]. The raw string is for libvirt and for
//! libvirt's own file names ([`DomainName::as_str`]), never for a message.

use std::fmt;

/// How many characters of a name a message shows (libvirt's own limit is
/// far longer; a message needs only enough to tell domains apart).
pub(crate) const SHOWN_CHARS: usize = 200;

/// A domain name; `Display` quotes and escapes it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DomainName(String);

impl DomainName {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        DomainName(name.into())
    }

    /// The name as libvirt knows it: for lookups and libvirt's file names
    /// (`<name>_VARS.fd`), never for a message.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short: String = self.0.chars().take(SHOWN_CHARS).collect();
        write!(f, "'{}'", crate::logging::escaped(&short))
    }
}

/// The same as `Display`: a `{:?}` in a panic or a log is still escaped.
impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<&str> for DomainName {
    fn from(name: &str) -> Self {
        DomainName::new(name)
    }
}

impl From<String> for DomainName {
    fn from(name: String) -> Self {
        DomainName(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_and_escapes_what_could_forge_a_line() {
        let n = DomainName::new("vm\nFAKE: line\u{202E}x");
        assert_eq!(n.to_string(), "'vm\\nFAKE: line\\u{202e}x'");
        assert_eq!(format!("{n:?}"), n.to_string());
        assert_eq!(n.as_str(), "vm\nFAKE: line\u{202E}x");
    }

    #[test]
    fn display_cuts_a_long_name() {
        let n = DomainName::new("a".repeat(SHOWN_CHARS + 50));
        assert_eq!(n.to_string().len(), SHOWN_CHARS + 2);
    }
}
