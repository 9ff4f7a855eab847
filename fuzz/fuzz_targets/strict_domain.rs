//! The strict domain-XML reader (issue 17) on arbitrary bytes: never a
//! panic or a hang; a malformed document is refused with a position; and
//! whatever it accepts is a single `<domain>` document: anything but
//! whitespace, comments and PIs appended after it is refused, while a
//! comment and a PI appended change nothing that was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virt_tpm_state::domain::{parse_domain, DomainXmlError};
use virt_tpm_state::format::NAMESPACE_URI;

fuzz_target!(|data: &[u8]| {
    let info = match parse_domain(data, NAMESPACE_URI) {
        Ok(info) => info,
        Err(DomainXmlError::Malformed(m)) => {
            assert!(!m.contains('\n'), "a message on more than one line");
            return;
        }
        Err(_) => return,
    };
    for tail in [&b"<domain/>"[..], b"x", b"<![CDATA[x]]>", b"<a/>"] {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\n");
        more.extend_from_slice(tail);
        assert!(
            parse_domain(&more, NAMESPACE_URI).is_err(),
            "accepted content after the root element"
        );
    }
    let mut more = data.to_vec();
    more.extend_from_slice(b"\n<!-- c --><?pi x?>\n");
    let again = parse_domain(&more, NAMESPACE_URI).expect("a comment and a PI after the root");
    assert_eq!(again, info);
});
