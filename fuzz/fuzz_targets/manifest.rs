//! Manifest parsing (multi-document YAML and JSON, with the agent's limits) and the path
//! and file-name rules of rendering: never a panic, never more than the limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_agent::git::{parse_documents, safe_entry_name, ManifestFile, YAML_MAX_DOCUMENTS};

fuzz_target!(|data: &[u8]| {
    for path in ["m.yaml", "m.json"] {
        let f = ManifestFile {
            path: path.into(),
            data: data.to_vec(),
        };
        if let Ok(docs) = parse_documents(&f) {
            assert!(docs.len() <= YAML_MAX_DOCUMENTS);
            assert!(docs.iter().all(|d| !d.is_null()));
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = roost_schemas::rollout::normalize_path(s) {
            assert!(!p.starts_with('/'));
            // "" is the repository root; otherwise whole, non-empty segments.
            assert!(p.is_empty() || p.split('/').all(|seg| seg != ".." && !seg.is_empty()));
        }
        let _ = safe_entry_name(s);
    }
});
