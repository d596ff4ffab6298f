//! What the backend reads from a domain's XML: the opt-out element, its
//! tags, and balloon autodeflate.
//!
//! Deliberately a tiny scanner, not an XML parser: the metadata element is
//! ours and flat, and `<memballoon>`'s one attribute is all that is read.
//! The XML is read once per domain (first sight, or a new domain id), so the
//! scanner's cost does not matter; its dependencies would.

/// XML namespace of the daemon's libvirt metadata element.
pub const METADATA_URI: &str = "https://vm-balancer.invalid/1";

/// What a domain's XML says about balancing it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainXml {
    /// `<vmb:balancer exclude="yes"/>` (or `true`, `1`): never touched.
    pub excluded: bool,
    /// The same element's `tags="a,b"`, trimmed, empty ones dropped.
    pub tags: Vec<String>,
    /// `<memballoon autodeflate='on'>`: the guest may deflate on its own.
    pub autodeflate: bool,
    /// `<memballoon freePageReporting='on'>`: the guest reports free pages,
    /// which the host drops from QEMU's memory without the balloon.
    pub free_page_reporting: bool,
}

/// Scans a domain's XML for the metadata element ([`METADATA_URI`]) and the
/// balloon's autodeflate.
pub fn parse_domain_xml(xml: &str) -> DomainXml {
    let balloon = tag_with(xml, "<memballoon");
    let autodeflate = balloon.is_some_and(|t| attr(t, "autodeflate").as_deref() == Some("on"));
    let free_page_reporting = balloon.is_some_and(|t| attr(t, "freePageReporting").as_deref() == Some("on"));
    let mut excluded = false;
    let mut tags = Vec::new();
    if let Some(meta) = xml.find(&format!("\"{METADATA_URI}\"")).or_else(|| xml.find(&format!("'{METADATA_URI}'"))) {
        let start = xml[..meta].rfind('<').unwrap_or(0);
        let end = xml[meta..].find('>').map_or(xml.len(), |e| meta + e + 1);
        let element = &xml[start..end];
        excluded = matches!(attr(element, "exclude").as_deref(), Some("yes" | "true" | "1"));
        if let Some(t) = attr(element, "tags") {
            tags = t.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
    }
    DomainXml { excluded, tags, autodeflate, free_page_reporting }
}

/// The first start tag beginning with `open`, up to its `>`.
fn tag_with<'a>(xml: &'a str, open: &str) -> Option<&'a str> {
    let start = xml.find(open)?;
    let end = xml[start..].find('>')? + start + 1;
    Some(&xml[start..end])
}

/// An attribute's value in one start tag, single- or double-quoted.
fn attr(element: &str, name: &str) -> Option<String> {
    for quote in ['\'', '"'] {
        let key = format!(" {name}={quote}");
        if let Some(i) = element.find(&key) {
            let rest = &element[i + key.len()..];
            return rest.find(quote).map(|e| rest[..e].to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_scan_finds_opt_out_tags_autodeflate_and_free_page_reporting() {
        let xml = r#"<domain><metadata><vmb:balancer xmlns:vmb="https://vm-balancer.invalid/1" exclude="yes" tags="db, latency"/></metadata>
            <devices><memballoon model='virtio' autodeflate='on'><stats period='1'/></memballoon></devices></domain>"#;
        assert_eq!(
            parse_domain_xml(xml),
            DomainXml {
                excluded: true,
                tags: vec!["db".to_string(), "latency".to_string()],
                autodeflate: true,
                free_page_reporting: false
            }
        );
        assert_eq!(
            parse_domain_xml("<domain><memballoon model='virtio'/></domain>"),
            DomainXml { excluded: false, tags: vec![], autodeflate: false, free_page_reporting: false }
        );
        let reporting = parse_domain_xml(r#"<domain><devices><memballoon model="virtio" freePageReporting="on"/></devices></domain>"#);
        assert!(reporting.free_page_reporting && !reporting.autodeflate);
        let off = parse_domain_xml("<domain><memballoon model='virtio' freePageReporting='off'/></domain>");
        assert!(!off.free_page_reporting);
    }
}
