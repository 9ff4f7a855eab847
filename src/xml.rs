//! The hardened XML reader: a pull reader over hostile bytes that knows
//! nothing of what the document means. Pure: bytes in, nodes out.
//!
//! Anyone who may define a domain controls the document, so the reader
//! refuses DOCTYPEs outright (no entity expansion, no billion laughs) and
//! characters XML forbids, bounds nesting depth, namespace declarations in
//! scope, attributes per element and the size of a subtree it keeps, and
//! never quotes the document in an error (an error is a kind and a place).
//! The caller ([`crate::domain`]) says which root it expects and which
//! elements may occur once, and asks for the attributes only of elements
//! whose attributes it reads (any others may carry any number).

use quick_xml::encoding::Decoder;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use std::borrow::Cow;
use std::collections::HashSet;

/// Deepest nesting accepted anywhere in a domain XML. libvirt's own documents
/// stay under 10; anything far deeper is an attack on the reader.
pub(crate) const MAX_DEPTH: usize = 64;
/// Most namespace declarations in scope at once. libvirt's documents have a
/// handful (one per application's metadata element). The XML reader looks a
/// prefix up by scanning every binding in scope, once per element, so
/// without a bound a document with many declarations and many elements costs
/// time quadratic in its size (minutes for a few MiB, in the start path of
/// every VM, with libvirt holding the domain's lock).
pub(crate) const MAX_NAMESPACES_IN_SCOPE: usize = 128;
/// Most attributes on an element whose attributes we read (ours: at most
/// 8; libvirt's <os>, <loader>, <tpm>...: a handful). Keeps the memory
/// spent on one element proportional to what it can legitimately hold
/// rather than ~20 times the hostile input.
pub(crate) const MAX_ATTRIBUTES: usize = 64;

/// A small owned element tree: what we keep of our metadata element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XmlElement {
    /// Namespace URI the element resolved to, if any.
    pub(crate) namespace: Option<String>,
    /// Local name (prefix stripped).
    pub(crate) name: String,
    /// Unprefixed attributes, unescaped, in document order.
    pub(crate) attributes: Vec<(String, String)>,
    pub children: Vec<XmlElement>,
    /// Concatenated text content directly inside this element.
    pub text: String,
}

impl XmlElement {
    pub fn attr(&self, name: &str) -> Option<&str> {
        find(&self.attributes, name)
    }
}

/// The value of attribute `key` in a list of attributes.
pub(crate) fn find<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Why the reader refused a document. [`crate::domain::DomainXmlError`]
/// maps each kind to the message the user sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum XmlError {
    /// Not well-formed, or a rule of the caller broken; the text says what
    /// and where (line, column), never quoting the document.
    #[error("not well-formed: {0}")]
    Malformed(String),
    #[error("contains a DOCTYPE")]
    Doctype,
    #[error("nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
    /// The root element's local name (shortened), not the one expected.
    #[error("the root element is <{0}>")]
    WrongRoot(String),
    #[error("declares more than {MAX_NAMESPACES_IN_SCOPE} XML namespaces in one scope")]
    TooManyNamespaces,
    /// The element's local name (shortened).
    #[error("element <{0}> has more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes(String),
    /// A kept subtree ran out of its element budget.
    #[error("a kept subtree has too many elements")]
    SubtreeTooLarge,
}

/// One step of the document, inside the root element (comments, PIs and
/// whitespace around the root are checked and skipped).
pub(crate) enum Node<'a> {
    /// An element opens; [`Reader::path`] now ends with it.
    Start(Start<'a>),
    /// Text or CDATA directly inside the current element, as libxml2 reads
    /// it: unescaped, line ends normalized, nothing trimmed.
    Text(String),
    /// The current element closes.
    End,
}

/// An element that just opened.
pub(crate) struct Start<'a> {
    element: BytesStart<'a>,
    xml: &'a [u8],
    at: u64,
    decoder: Decoder,
    /// Namespace URI the element resolved to, if any.
    pub(crate) namespace: Option<String>,
    /// Local name (prefix stripped).
    pub(crate) name: String,
}

impl Start<'_> {
    /// A refusal placed at this element's start tag.
    pub(crate) fn refuse(&self, what: &str) -> XmlError {
        malformed_at(self.xml, self.at, what)
    }

    /// The element's unprefixed attributes, unescaped and normalized as
    /// XML 1.0 says, in document order; at most [`MAX_ATTRIBUTES`]
    /// attributes (namespace declarations included), no duplicates.
    pub(crate) fn attributes(&self) -> Result<Vec<(String, String)>, XmlError> {
        let at = |what: &str| self.refuse(what);
        let mut out = Vec::new();
        // quick-xml's own duplicate check compares each attribute with every
        // earlier one: quadratic in the attribute count, which the hostile XML
        // chooses (an element with 1e6 attributes took over an hour). A set
        // over all keys, prefixed ones included, does the same job in linear
        // time.
        let mut seen: HashSet<&[u8]> = HashSet::new();
        for a in self.element.attributes().with_checks(false) {
            let a = a.map_err(|_| at("invalid attribute syntax"))?;
            if seen.len() == MAX_ATTRIBUTES {
                return Err(XmlError::TooManyAttributes(short(&self.name)));
            }
            // MUST (FORMAT.md): refuse an element with a duplicate attribute.
            if !seen.insert(a.key.into_inner()) {
                return Err(at("a duplicate attribute"));
            }
            // Namespace declarations and prefixed attributes are not ours.
            if a.key.prefix().is_some() || a.key.as_ref() == b"xmlns" {
                continue;
            }
            let key = std::str::from_utf8(a.key.as_ref())
                .map_err(|_| at("a name that is not UTF-8"))?
                .to_string();
            let raw = self
                .decoder
                .decode(&a.value)
                .map_err(|_| at("text that is not UTF-8"))?;
            out.push((key, unescape(&normalize_attribute(&raw), at)?));
        }
        Ok(out)
    }
}

/// The reader: a document, the root element it must have, and the paths
/// of elements that may occur only once.
pub(crate) struct Reader<'a> {
    xml: &'a [u8],
    inner: NsReader<&'a [u8]>,
    root: &'a str,
    once: &'a [&'a str],
    seen_once: HashSet<&'a str>,
    /// Local names from the root to the current element, `/`-separated.
    path: String,
    /// Length of `path` before each open element was added.
    marks: Vec<usize>,
    /// Namespace declarations on each open element, and their sum.
    ns_decls: Vec<usize>,
    ns_in_scope: usize,
    seen_root: bool,
    /// The root element has ended: only whitespace, comments and PIs follow.
    root_done: bool,
}

impl<'a> Reader<'a> {
    /// A reader of `xml`, whose root element must be `root` and in which
    /// an element at a path of `once` (e.g. `domain/os/nvram`) may occur
    /// only once: a second one is refused, not merged.
    pub(crate) fn new(xml: &'a [u8], root: &'a str, once: &'a [&'a str]) -> Result<Self, XmlError> {
        let mut inner = NsReader::from_reader(xml);
        inner.config_mut().expand_empty_elements = true;
        if let Some(pos) = first_forbidden_byte(xml) {
            return Err(malformed_at(
                xml,
                pos as u64,
                "a character XML does not allow",
            ));
        }
        Ok(Reader {
            xml,
            inner,
            root,
            once,
            seen_once: HashSet::new(),
            path: String::new(),
            marks: Vec::new(),
            ns_decls: Vec::new(),
            ns_in_scope: 0,
            seen_root: false,
            root_done: false,
        })
    }

    /// Local names from the root to the current element, `/`-separated
    /// (`domain/devices/tpm`).
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The next node; `None` once the document has ended after its root.
    pub(crate) fn read(&mut self) -> Result<Option<Node<'a>>, XmlError> {
        loop {
            // Errors are placed at the start of the event they occur in.
            let here = self.inner.buffer_position();
            let xml = self.xml;
            let at = |what: &str| malformed_at(xml, here, what);
            let (ns, event) = self
                .inner
                .read_resolved_event()
                .map_err(|e| at(describe(&e)))?;
            match event {
                Event::DocType(_) => return Err(XmlError::Doctype),
                Event::Start(e) => {
                    let name = std::str::from_utf8(e.local_name().into_inner())
                        .map_err(|_| at("a name that is not UTF-8"))?
                        .to_string();
                    let namespace = match ns {
                        ResolveResult::Bound(n) => {
                            Ok(Some(String::from_utf8_lossy(n.into_inner()).into_owned()))
                        }
                        ResolveResult::Unbound => Ok(None),
                        ResolveResult::Unknown(_) => Err(()),
                    };
                    self.open(&e, &name, here)?;
                    let namespace = namespace
                        .map_err(|()| at("an element with an undeclared namespace prefix"))?;
                    return Ok(Some(Node::Start(Start {
                        element: e,
                        xml,
                        at: here,
                        decoder: self.inner.decoder(),
                        namespace,
                        name,
                    })));
                }
                Event::End(_) => {
                    if let Some(mark) = self.marks.pop() {
                        self.path.truncate(mark);
                    }
                    self.root_done = self.marks.is_empty();
                    self.ns_in_scope -= self.ns_decls.pop().unwrap_or(0);
                    return Ok(Some(Node::End));
                }
                Event::Text(t) => {
                    let raw = std::str::from_utf8(t.as_ref())
                        .map_err(|_| at("text that is not UTF-8"))?;
                    let text = unescape(&normalize_line_ends(raw), at)?;
                    if self.marks.is_empty() {
                        if !text.chars().all(|c| matches!(c, ' ' | '\t' | '\n' | '\r')) {
                            return Err(at(&self.outside_root("text")));
                        }
                        continue;
                    }
                    return Ok(Some(Node::Text(text)));
                }
                Event::CData(c) => {
                    if self.marks.is_empty() {
                        return Err(at(&self.outside_root("a CDATA section")));
                    }
                    let text = std::str::from_utf8(&c).map_err(|_| at("text that is not UTF-8"))?;
                    // libxml2 reads a CDATA section as text, line ends normalized.
                    return Ok(Some(Node::Text(normalize_line_ends(text).into_owned())));
                }
                Event::Eof => {
                    if !self.seen_root {
                        return Err(XmlError::Malformed("empty document".into()));
                    }
                    if !self.marks.is_empty() {
                        return Err(XmlError::Malformed("unexpected end of document".into()));
                    }
                    return Ok(None);
                }
                _ => {}
            }
        }
    }

    /// Where `what`, found outside the root element, is: the message's words.
    fn outside_root(&self, what: &str) -> String {
        let place = if self.root_done { "after" } else { "before" };
        format!("{what} {place} the root element")
    }

    /// The checks on an element that opens, in the order the reader has
    /// always made them (so a document breaking several rules gets the same
    /// refusal); the namespace prefix is checked last, by the caller.
    fn open(&mut self, e: &BytesStart<'_>, name: &str, here: u64) -> Result<(), XmlError> {
        let xml = self.xml;
        let at = |what: &str| malformed_at(xml, here, what);
        if self.root_done {
            return Err(at("an element after the root element"));
        }
        let mark = self.path.len();
        if !self.path.is_empty() {
            self.path.push('/');
        }
        self.path.push_str(name);
        if let Some(&once) = self.once.iter().find(|p| **p == self.path) {
            if !self.seen_once.insert(once) {
                // `domain/os/nvram` -> "a second <os>/<nvram>".
                let shown: Vec<String> =
                    once.split('/').skip(1).map(|n| format!("<{n}>")).collect();
                return Err(at(&format!("a second {}", shown.join("/"))));
            }
        }
        if !self.seen_root {
            self.seen_root = true;
            if name != self.root {
                return Err(XmlError::WrongRoot(short(name)));
            }
        }
        if self.marks.len() >= MAX_DEPTH {
            return Err(XmlError::TooDeep);
        }
        let decls = namespace_declarations(e);
        self.ns_in_scope += decls;
        if self.ns_in_scope > MAX_NAMESPACES_IN_SCOPE {
            return Err(XmlError::TooManyNamespaces);
        }
        self.ns_decls.push(decls);
        self.marks.push(mark);
        Ok(())
    }

    /// Reads the rest of the element `start` opened into a tree, spending one
    /// unit of `budget` per element (`start` included) and refusing the
    /// document when it runs out: what is kept stays small whatever the
    /// input. Text goes to the element it is directly inside.
    pub(crate) fn keep(
        &mut self,
        start: Start<'a>,
        budget: &mut usize,
    ) -> Result<XmlElement, XmlError> {
        let mut open = vec![kept(start, budget)?];
        loop {
            match self.read()? {
                Some(Node::Start(s)) => open.push(kept(s, budget)?),
                Some(Node::Text(t)) => {
                    if let Some(top) = open.last_mut() {
                        top.text.push_str(&t);
                    }
                }
                Some(Node::End) => {
                    let done = open.pop().unwrap_or_default();
                    match open.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Ok(done),
                    }
                }
                // `read` refuses an end of document inside an element.
                None => return Err(XmlError::Malformed("unexpected end of document".into())),
            }
        }
    }
}

/// `raw` with its entity and character references replaced, refusing a
/// reference to a character XML does not allow.
fn unescape(raw: &str, at: impl Fn(&str) -> XmlError) -> Result<String, XmlError> {
    let text = quick_xml::escape::unescape(raw)
        .map_err(|e| at(describe(&quick_xml::Error::Escape(e))))?
        .into_owned();
    if !text.chars().all(xml_char) {
        return Err(at(
            "a character reference to a character XML does not allow",
        ));
    }
    Ok(text)
}

/// One element of a kept subtree, paid for from `budget`.
fn kept(s: Start<'_>, budget: &mut usize) -> Result<XmlElement, XmlError> {
    *budget = budget.checked_sub(1).ok_or(XmlError::SubtreeTooLarge)?;
    Ok(XmlElement {
        attributes: s.attributes()?,
        namespace: s.namespace,
        name: s.name,
        ..Default::default()
    })
}

/// A well-formedness error, by kind and place only. The XML library's own
/// messages quote the document (an end tag it did not expect can run on into
/// the base64 of a state file, and can hold a newline), while this message
/// ends up on the hook's one stderr line and in syslog.
pub(crate) fn malformed_at(xml: &[u8], pos: u64, what: &str) -> XmlError {
    let pos = usize::try_from(pos).unwrap_or(usize::MAX).min(xml.len());
    let before = &xml[..pos];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let column = 1 + pos
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
    XmlError::Malformed(format!("{what} (line {line}, column {column})"))
}

/// An element name as an error message shows it: at most 40 characters
/// (names hold no control characters: those are refused up front).
fn short(name: &str) -> String {
    match name.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &name[..i]),
        None => name.to_string(),
    }
}

/// What went wrong, without the document text the library's message quotes.
pub(crate) fn describe(e: &quick_xml::Error) -> &'static str {
    use quick_xml::errors::{Error as E, IllFormedError as I, SyntaxError as S};
    match e {
        E::Syntax(S::InvalidBangMarkup) => "unknown markup after `<!`",
        E::Syntax(S::UnclosedPIOrXmlDecl) => "a processing instruction is not closed",
        E::Syntax(S::UnclosedComment) => "a comment is not closed",
        E::Syntax(S::UnclosedDoctype) => "a DOCTYPE is not closed",
        E::Syntax(S::UnclosedCData) => "a CDATA section is not closed",
        E::Syntax(S::UnclosedTag) => "a tag is not closed",
        E::IllFormed(I::MissingEndTag(_)) => "an element is not closed",
        E::IllFormed(I::UnmatchedEndTag(_)) => "an end tag has no start tag",
        E::IllFormed(I::MismatchedEndTag { .. }) => "an end tag does not match its start tag",
        E::IllFormed(_) => "ill-formed markup",
        E::InvalidAttr(_) => "invalid attribute syntax",
        E::Encoding(_) => "text that is not UTF-8",
        E::Escape(_) => "an undefined entity or an invalid character reference",
        E::Namespace(_) => "an invalid namespace declaration",
        E::Io(_) => "a read error",
    }
}

/// Whether XML 1.0 allows `c` in a document (production `Char`). quick-xml
/// does not check it; libxml2 (libvirt) does, so such a document never
/// comes from libvirt, and a character the encoder could not write back
/// must not be accepted.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Offset of the first byte that starts a character XML forbids (C0
/// controls but tab, newline, CR; U+FFFE, U+FFFF), if any.
fn first_forbidden_byte(xml: &[u8]) -> Option<usize> {
    xml.iter().enumerate().position(|(i, &b)| {
        (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
            || (b == 0xEF
                && xml.get(i + 1) == Some(&0xBF)
                && matches!(xml.get(i + 2), Some(0xBE | 0xBF)))
    })
}

/// XML 1.0 §2.11: every `\r\n` and lone `\r` is read as `\n`.
fn normalize_line_ends(s: &str) -> Cow<'_, str> {
    if s.contains('\r') {
        Cow::Owned(s.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        Cow::Borrowed(s)
    }
}

/// XML 1.0 §3.3.3 for a CDATA-typed attribute (all of libvirt's): line ends
/// normalized, then each literal tab, newline or CR becomes a space;
/// character references (`&#10;`) keep their character.
fn normalize_attribute(s: &str) -> Cow<'_, str> {
    if s.contains(['\r', '\n', '\t']) {
        Cow::Owned(normalize_line_ends(s).replace(['\n', '\t'], " "))
    } else {
        Cow::Borrowed(s)
    }
}

/// How many `xmlns` / `xmlns:*` declarations an element carries.
fn namespace_declarations(e: &BytesStart<'_>) -> usize {
    e.attributes()
        .with_checks(false)
        .filter_map(Result::ok)
        .filter(|a| a.key.as_namespace_binding().is_some())
        .count()
}
